"""OpenAI CLIP files -> our towers: rename table coverage, image/text parity with open_clip, TorchScript policy."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from regionclip.checkpoint.io import CheckpointError
from regionclip.checkpoint.openai_clip import is_torchscript_archive, read_clip_checkpoint, split_clip_state_dict
from regionclip.factory.clip_towers import load_clip_towers
from regionclip.modeling.clip_resnet import ModifiedResNet
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.factory import load_text_tower
from regionclip.text.tokenizer import tokenize

open_clip = pytest.importorskip("open_clip")


def _randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter and give every BatchNorm random statistics/affine values (our BN is frozen, so
    the check is only meaningful if open_clip's eval-mode BN uses non-trivial running stats)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.copy_(1 + torch.randn(m.num_features, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif hasattr(m, "running_var") and hasattr(m, "running_mean"):  # our FrozenBatchNorm2d
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _open_clip(name: str, seed: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=None)  # -quickgelu = the OpenAI activation
    return _randomize_(model, seed)


class _TinyOpenAIClip(nn.Module):
    """A miniature OpenAI CLIP object: ``visual`` + top-level text modules, exactly OpenAI's attribute names."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = ModifiedResNet((1, 1, 1, 1), output_dim=16, heads=4, input_resolution=64, width=8)
        text = CLIPTextTransformer(width=64, heads=1, layers=2, embed_dim=16)
        self.token_embedding, self.positional_embedding = text.token_embedding, text.positional_embedding
        self.transformer, self.ln_final, self.text_projection = text.transformer, text.ln_final, text.text_projection
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


@pytest.fixture(scope="module")
def rn50_open_clip() -> nn.Module:
    return _open_clip("RN50-quickgelu", seed=0)


def test_rename_table_covers_every_key(rn50_open_clip) -> None:
    parts = split_clip_state_dict(rn50_open_clip.state_dict(), "open_clip RN50")
    assert not parts.unknown
    assert set(parts.image) == set(ModifiedResNet((3, 4, 6, 3), 1024, 32, 224, 64).state_dict())
    assert set(parts.text) == set(CLIPTextTransformer().state_dict())
    assert set(parts.ignored) == {"logit_scale"} | {k for k in rn50_open_clip.state_dict()
                                                    if k.endswith("num_batches_tracked")}


def test_encode_image_and_text_match_open_clip_rn50(rn50_open_clip) -> None:
    towers = load_clip_towers(rn50_open_clip.state_dict())
    assert towers.report.ok, towers.report.summary()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["itap of my traffic cone."])
    with torch.no_grad():
        a, b = towers.image.encode_image(x), rn50_open_clip.encode_image(x)
        ta, tb = towers.text.encode_text(tokens), rn50_open_clip.encode_text(tokens)
    print(f"RN50 encode_image: max |ours - open_clip| = {(a - b).abs().max():.3g} (max |feature| {b.abs().max():.3g}); "
          f"encode_text: {(ta - tb).abs().max():.3g}")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-4)


def test_encode_image_matches_open_clip_rn50x4() -> None:
    ref = _open_clip("RN50x4-quickgelu", seed=1)
    towers = load_clip_towers(ref.state_dict())
    assert towers.image.input_resolution == 288 and towers.text.embed_dim == 640
    x = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = towers.image.encode_image(x), ref.encode_image(x)
    print(f"RN50x4 encode_image: max |ours - open_clip| = {(a - b).abs().max():.3g} (max |feature| {b.abs().max():.3g})")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.fixture(scope="module")
def tiny_clip() -> _TinyOpenAIClip:
    return _randomize_(_TinyOpenAIClip(), seed=3)


def _same_towers(towers, ref: _TinyOpenAIClip) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(towers.image.encode_image(x), ref.visual.encode_image(x))
        want = CLIPTextTransformer(width=64, heads=1, layers=2, embed_dim=16)
        want.load_state_dict({k: v for k, v in ref.state_dict().items()
                              if not k.startswith("visual.") and k != "logit_scale"})
        torch.testing.assert_close(towers.text.encode_text(tokens), want.eval().encode_text(tokens))


def test_torchscript_archive_needs_allow_jit(tmp_path, tiny_clip) -> None:
    path = tmp_path / "RN50.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(tiny_clip, torch.randn(1, 3, 64, 64), check_trace=False).save(str(path))
    assert is_torchscript_archive(path)
    with pytest.raises(CheckpointError, match="--allow-jit") as err:
        read_clip_checkpoint(path)
    assert "torch.jit.load" in str(err.value)  # the conversion recipe is in the message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's own deprecation notice
        towers = load_clip_towers(path, allow_jit=True)
    _same_towers(towers, tiny_clip)


def test_oai_clip_style_regionclip_file(tmp_path, tiny_clip) -> None:
    """A ``*_OAI_CLIP.pth``-like file: {'model': ...} with student ``backbone.*``, a teacher copy, bare text keys,
    saved in fp16 (as OpenAI's weights are): loads into float32 towers, teacher reported as ignored."""
    sd = tiny_clip.state_dict()
    model = {("backbone." + k[len("visual."):] if k.startswith("visual.") else k): v.half() for k, v in sd.items()}
    model.update({"teacher_" + k: v for k, v in model.items() if k.startswith("backbone.")})
    path = tmp_path / "teacher_RN50_student_RN50_OAI_CLIP.pth"
    torch.save({"model": model, "iteration": 0}, path)
    towers = load_clip_towers(path)
    assert towers.image.conv1.weight.dtype == torch.float32
    assert any(k.startswith("teacher_backbone.") for k in towers.report.ignored)
    ref = _TinyOpenAIClip()
    ref.load_state_dict({k: v.half().float() for k, v in sd.items()})
    _same_towers(towers, ref.eval())


def test_text_encoder_from_openai_and_regionclip_files_agree(tmp_path, tiny_clip) -> None:
    sd = tiny_clip.state_dict()
    torch.save(sd, tmp_path / "openai.pth")
    rc = {("backbone." + k[len("visual."):] if k.startswith("visual.") else "lang_encoder." + k): v
          for k, v in sd.items() if k != "logit_scale"}
    torch.save({"model": rc}, tmp_path / "regionclip.pth")
    tokens = tokenize(["a photo of a cat.", ""])
    with torch.no_grad():
        a = load_text_tower(tmp_path / "openai.pth").encode_text(tokens)
        b = load_text_tower(tmp_path / "regionclip.pth").encode_text(tokens)
    assert torch.equal(a, b)


def test_bad_files_give_clear_errors(tmp_path, tiny_clip) -> None:
    sd = dict(tiny_clip.state_dict())
    with pytest.raises(CheckpointError, match="ViT"):
        split_clip_state_dict({**sd, "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="neither CLIP tower"):
        load_clip_towers({**sd, "some_head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="mixes two models"):
        split_clip_state_dict({**sd, "backbone.conv1.weight": sd["visual.conv1.weight"] + 1})
    torch.save({"model": {k: v for k, v in sd.items() if k.startswith("visual.")}}, tmp_path / "finetuned.pth")
    with pytest.raises(CheckpointError, match="no CLIP text-encoder weights"):
        load_text_tower(tmp_path / "finetuned.pth")
    with pytest.raises(FileNotFoundError):
        read_clip_checkpoint(tmp_path / "missing.pth")
