"""CLIP text transformer: same features as open_clip's (QuickGELU = OpenAI) text tower with the same weights."""
from __future__ import annotations

import pytest
import torch

from regionclip.checkpoint.io import CheckpointError
from regionclip.checkpoint.openai_clip import split_clip_state_dict
from regionclip.config import ClipTextConfig
from regionclip.factory import load_text_tower
from regionclip.factory.clip_towers import build_text_tower
from regionclip.modeling.text_encoder import CLIPTextTransformer, build_text_encoder, text_config_from_state_dict
from regionclip.text.tokenizer import tokenize

open_clip_model = pytest.importorskip("open_clip.model")

PROMPTS = ["a photo of a traffic cone.", "", "naïve café 🚗 &amp; friends", "word " * 100]


def _open_clip_with_text(cfg: ClipTextConfig, seed: int) -> torch.nn.Module:
    """An open_clip CLIP with a full-size text tower and a tiny image tower (the image side is not tested here),
    every parameter perturbed so that zero biases / unit LayerNorms do not hide mistakes."""
    torch.manual_seed(seed)
    model = open_clip_model.CLIP(
        embed_dim=cfg.embed_dim, quick_gelu=True,  # OpenAI's weights use QuickGELU
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64),
        text_cfg=open_clip_model.CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                             width=cfg.width, heads=cfg.heads, layers=cfg.layers))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("variant", ["rn50", "rn50x4"])
def test_text_features_match_open_clip(variant: str) -> None:
    cfg = getattr(ClipTextConfig, variant)()
    ref = _open_clip_with_text(cfg, seed=1)
    text_sd = split_clip_state_dict(ref.state_dict(), "open_clip").text  # through our rename table
    ours = build_text_tower(text_sd)
    assert text_config_from_state_dict(text_sd) == cfg
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        a, b = ours.encode_text(tokens), ref.encode_text(tokens)
    diff = (a - b).abs().max().item()
    print(f"{variant} text features: max |ours - open_clip| = {diff:.3g} (max |feature| {b.abs().max():.3g})")
    assert a.shape == (len(PROMPTS), cfg.embed_dim)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.encode_text(tokens[:1], normalize=True).norm(dim=-1), torch.ones(1))


def test_trimmed_context_is_exact() -> None:
    """Dropping trailing positions after the EOT cannot change the pooled feature (causal mask)."""
    torch.manual_seed(0)
    enc = CLIPTextTransformer(width=64, heads=2, layers=2, embed_dim=32).eval()
    tokens = tokenize(["a photo of a dog.", "a cat"])
    eot = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_text(tokens[:, :eot]), enc.encode_text(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["rn50", "rn50x4"])
def test_state_dict_matches_official_lang_encoder(shared_dir, variant: str) -> None:
    """Keys and shapes equal the released checkpoints' ``lang_encoder.*`` entries (minus the prefix)."""
    import json

    spec = json.loads((shared_dir / "parity" / f"official_{variant}_keys.json").read_text())["regionclip_ckpt_keys"]
    official = {k[len("lang_encoder."):]: v["shape"] for k, v in spec.items() if k.startswith("lang_encoder.")}
    ours = {k: list(v.shape) for k, v in build_text_encoder(getattr(ClipTextConfig, variant)()).state_dict().items()}
    assert ours == official


def test_bad_inputs_raise_clear_errors() -> None:
    enc = CLIPTextTransformer(width=64, heads=2, layers=1, embed_dim=32, context_length=8)
    with pytest.raises(ValueError, match="exceed the context length"):
        enc.encode_text(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        enc.encode_text(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextTransformer(width=64, heads=3, layers=1)
    sd = enc.state_dict()
    with pytest.raises(KeyError, match="text_projection"):
        text_config_from_state_dict({k: v for k, v in sd.items() if k != "text_projection"})
    sd = dict(sd)
    sd["ln_final.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="ln_final.weight"):
        build_text_tower(sd)


def test_bf16_class_embeddings_agree_with_float32(rn50_ckpts) -> None:
    """bfloat16 text tower (linear layers bf16, residual stream / LayerNorm float32): the 81-template class
    embeddings keep cosine >= 0.9999 to float32 and classify the same (argmax over the names)."""
    from regionclip.assets import vocabulary
    from regionclip.text.embeddings import concept_embeddings

    enc = load_text_tower(rn50_ckpts["regionclip"])
    names = vocabulary("lvis1203")[::150][:8]
    e32 = concept_embeddings(names, enc)
    e16 = concept_embeddings(names, enc, dtype="bfloat16")
    assert e16.dtype == torch.float32 and e16.shape == e32.shape
    cos = torch.nn.functional.cosine_similarity(e32, e16, dim=1)
    assert float(cos.min()) >= 0.9999, cos
    # queries near the class embeddings (what region embeddings of those classes look like), temperature 0.01
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    queries = unit(e32.repeat(8, 1), dim=1) + 0.05 * torch.randn(8 * len(names), e32.shape[1], generator=g) / 32
    logits32 = unit(queries, dim=1) @ unit(e32, dim=1).t() / 0.01
    logits16 = unit(queries, dim=1) @ unit(e16, dim=1).t() / 0.01
    assert torch.equal(logits32.argmax(1), logits16.argmax(1))


def test_text_dtype_auto_follows_native_bf16(monkeypatch) -> None:
    from regionclip.inference import hardware
    from regionclip.inference.hardware import resolve_text_dtype

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    assert resolve_text_dtype("auto") == "float32"  # bf16 not measured faster yet (TEXT_AUTO_BF16)
    monkeypatch.setattr(hardware, "TEXT_AUTO_BF16", True)
    assert resolve_text_dtype("auto") == "bfloat16"
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert resolve_text_dtype("auto") == "float32"
    assert resolve_text_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_text_dtype("half")
