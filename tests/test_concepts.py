"""Concept embeddings (spec §5), embed-concepts CLI, run-time vocabulary cache, bad input."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import regionclip.factory as factory_mod
import regionclip.text.name_cache as name_cache
from regionclip.checkpoint.embedding_files import load_concept_embeddings, save_concept_embeddings
from regionclip.checkpoint.io import CheckpointError
from regionclip.cli.embed_concepts import main as embed_main
from regionclip.factory import load_text_tower
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.text.embeddings import concept_embeddings
from regionclip.text.prompts import default_templates, resolve_templates
from regionclip.text.tokenizer import EOT_ID, SOT_ID, default_tokenizer
from regionclip.text.vocabulary import parse_vocabulary


def class_embeddings(names, ckpt, **kw):
    """The name cache with the factory's text tower of ``ckpt`` as its lazy loader (what embed_names passes)."""
    return name_cache.class_embeddings(names, ckpt, lambda: factory_mod.load_text_tower(ckpt), **kw)


def _tiny_regionclip_ckpt(path: Path, seed: int) -> Path:
    """A RegionCLIP-format file ({'model': ...}) with a small random ``lang_encoder`` (width 64, 2 layers)."""
    torch.manual_seed(seed)
    enc = CLIPTextTransformer(width=64, heads=1, layers=2, embed_dim=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = {"lang_encoder." + k: v for k, v in enc.state_dict().items()}
    model["backbone.conv1.weight"] = torch.randn(4, 3, 3, 3)  # present in real files, ignored by the text path
    torch.save({"model": model}, path)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return _tiny_regionclip_ckpt(tmp_path / "tiny_regionclip.pth", seed=0)


def _count_encoder_use(monkeypatch) -> dict[str, int]:
    """Wrap the loader used by class_embeddings: counts checkpoint loads and prompts run through the encoder."""
    calls = {"load": 0, "prompts": 0}
    real = factory_mod.load_text_tower

    def loader(*args, **kwargs):
        calls["load"] += 1
        enc = real(*args, **kwargs)
        encode = enc.encode_text

        def counted(tokens, normalize=False):
            calls["prompts"] += tokens.shape[0]
            return encode(tokens, normalize)

        enc.encode_text = counted
        return enc

    monkeypatch.setattr(factory_mod, "load_text_tower", loader)
    return calls


def _original_procedure(names, enc, templates, average="mean"):
    """Literal transcription of RegionCLIP's extraction: prompt_engineering + convert_example_to_features_bpe
    (77, EOT may be cut, zero pad) + full-length encoding, one concept at a time, mean over templates."""
    tok = default_tokenizer()
    rows = []
    for name in names:
        ids = []
        for t in templates:
            x = [SOT_ID] + tok.encode(t.replace("{}", name.replace(",", "").replace("+", " "))) + [EOT_ID]
            x = x[:77]
            ids.append(torch.tensor(x + [0] * (77 - len(x))))
        with torch.no_grad():
            f = enc.encode_text(torch.stack(ids))
        rows.append(f.mean(0) if average == "mean" else F.normalize(F.normalize(f, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def test_cli_file_equals_runtime_vocabulary_and_cache(rn50_ckpts, tmp_path, monkeypatch, capsys) -> None:
    ckpt = rn50_ckpts["regionclip"]
    names = ["traffic cone", "hot+dog, food"]
    (tmp_path / "concepts.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    out = tmp_path / "emb.pth"
    rc = embed_main([str(tmp_path / "concepts.txt"), "-o", str(out), "--weights", str(ckpt),
                   "--device", "cpu", "--no-progress"])
    assert rc == 0 and "2 concepts x 1024 dims" in capsys.readouterr().err
    from_file = torch.load(out, weights_only=True)  # the original's format: a bare [N, D] tensor
    assert isinstance(from_file, torch.Tensor) and from_file.shape == (2, 1024)
    assert not torch.allclose(from_file.norm(dim=1), torch.ones(2))  # stored unnormalised, like the original

    calls = _count_encoder_use(monkeypatch)
    t0 = time.perf_counter()
    first = class_embeddings(names, ckpt, cache_dir=tmp_path / "cache")
    t1 = time.perf_counter()
    second = class_embeddings(names, ckpt, cache_dir=tmp_path / "cache")
    t2 = time.perf_counter()
    print(f"class_embeddings RN50, 2 names x 81 templates: first {t1 - t0:.2f} s, cached {1e3 * (t2 - t1):.1f} ms")
    assert torch.equal(first, from_file)
    assert torch.equal(second, first)
    assert calls == {"load": 1, "prompts": 2 * 81}  # the second call never loaded nor ran the text encoder


def test_matches_original_procedure(tiny_ckpt) -> None:
    enc = load_text_tower(tiny_ckpt)
    long_name = "very " * 80 + "long"
    names = ["person", "hot+dog, food", "{curly} name", "naïve café", long_name]
    templates = default_templates()
    assert len(templates) == 81
    with pytest.warns(UserWarning, match="truncated like the original"):
        ours = concept_embeddings(names, enc, batch_size=100)  # batches straddle concepts
    torch.testing.assert_close(ours, _original_procedure(names, enc, templates), rtol=1e-5, atol=1e-6)
    norm = concept_embeddings(names[:2], enc, average="normalized", templates="zeroshot")
    torch.testing.assert_close(norm, _original_procedure(names[:2], enc, default_templates("zeroshot"), "norm"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.norm(dim=1), torch.ones(2))


def test_single_row_and_other_file_layouts(rn50_ckpts, tiny_ckpt, tmp_path) -> None:
    official = load_concept_embeddings(rn50_ckpts["concept_emb"], expected_dim=1024)
    assert official.shape == (65, 1024)
    row = official[3]
    torch.save(row.clone(), tmp_path / "single.pth")  # what the original wrote for one concept: [D]
    assert torch.equal(load_concept_embeddings(tmp_path / "single.pth"), row[None])
    torch.save(official[:4, None].clone(), tmp_path / "zs.pth")  # zero-shot branch: [N, 1, D]
    assert torch.equal(load_concept_embeddings(tmp_path / "zs.pth"), official[:4])
    save_concept_embeddings(official[:2], tmp_path / "e.safetensors")
    assert torch.equal(load_concept_embeddings(tmp_path / "e.safetensors"), official[:2])
    with pytest.raises(CheckpointError, match="dimension 1024 but the model expects 640"):
        load_concept_embeddings(rn50_ckpts["concept_emb"], expected_dim=640)
    torch.save(torch.zeros(2, 3, 4), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"\[N, D\]"):
        load_concept_embeddings(tmp_path / "bad.pth")
    # one concept through the CLI: we write [1, D] (documented difference), safetensors output
    out = tmp_path / "one.safetensors"
    assert embed_main(["forklift", "-o", str(out), "--weights", str(tiny_ckpt), "--device", "cpu",
                     "--no-progress", "--templates", "zeroshot"]) == 0
    emb = load_concept_embeddings(out)
    assert emb.shape == (1, 16)
    torch.testing.assert_close(emb, class_embeddings(["forklift"], tiny_ckpt, templates="zeroshot", use_cache=False))


def test_cache_is_per_name_and_invalidated_by_new_weights(tiny_ckpt, tmp_path, monkeypatch) -> None:
    calls = _count_encoder_use(monkeypatch)
    cache = tmp_path / "cache"
    kw = dict(cache_dir=cache, templates="zeroshot")
    ab = class_embeddings(["a cat", "a dog"], tiny_ckpt, **kw)
    assert calls == {"load": 1, "prompts": 4}
    bc = class_embeddings(["a dog", "a bird"], tiny_ckpt, **kw)
    assert calls == {"load": 2, "prompts": 6}  # only "a bird" was encoded
    assert torch.equal(bc[0], ab[1])
    class_embeddings(["a dog"], tiny_ckpt, cache_dir=cache)  # other templates -> other cache entry
    assert calls["prompts"] == 6 + 81
    _tiny_regionclip_ckpt(tiny_ckpt, seed=1)  # same path, new weights
    new = class_embeddings(["a cat", "a dog"], tiny_ckpt, **kw)
    assert calls["prompts"] == 6 + 81 + 4 and not torch.allclose(new, ab)
    n_files = len(list(cache.iterdir()))
    class_embeddings(["a fish"], tiny_ckpt, use_cache=False, cache_dir=cache, templates="zeroshot")
    assert len(list(cache.iterdir())) == n_files
    for f in cache.iterdir():
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable text-embedding cache"):
        again = class_embeddings(["a cat", "a dog"], tiny_ckpt, **kw)
    assert torch.equal(again, new)


def test_bad_names(tiny_ckpt, tmp_path) -> None:
    enc = load_text_tower(tiny_ckpt)
    with pytest.raises(ValueError, match="no class names"):
        concept_embeddings([], enc)
    with pytest.raises(ValueError, match="#1 is empty"):
        concept_embeddings(["car", "  "], enc, templates="zeroshot")
    with pytest.raises(ValueError, match="#0 is empty"):
        class_embeddings([",+"], tiny_ckpt, use_cache=False)  # nothing left after the original's cleaning
    with pytest.warns(UserWarning, match="duplicate class names"):
        dup = class_embeddings(["car", "cone", "Car "], tiny_ckpt, cache_dir=tmp_path / "c", templates="zeroshot")
    assert dup.shape[0] == 3 and torch.allclose(dup[0], dup[2], atol=1e-6)  # kept: rows match the list


def test_parse_vocabulary(tmp_path) -> None:
    assert parse_vocabulary(" car, traffic cone ") == ["car", "traffic cone"]
    assert len(parse_vocabulary("coco65")) == 65
    lvis = parse_vocabulary("lvis1203")
    assert len(lvis) == 1203 and "bat animal" in lvis and not any("_" in n or "(" in n for n in lvis)
    for bad in ("", "car,,cone", "car,"):
        with pytest.raises(ValueError):
            parse_vocabulary(bad)
    with pytest.raises(FileNotFoundError):
        parse_vocabulary("missing_classes.txt")
    f = tmp_path / "names.txt"
    f.write_bytes("\ufeffcar\nhot+dog, food\n\n\n".encode("utf-8"))  # BOM and trailing blank lines are fine
    assert parse_vocabulary(str(f)) == ["car", "hot+dog, food"]
    f.write_bytes(b"car\ncaf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"names\.txt, line 2: not valid UTF-8"):
        parse_vocabulary(str(f))
    f.write_text("car\n\ncone\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: blank line"):
        parse_vocabulary(str(f))
    with pytest.raises(ValueError, match="must contain"):
        resolve_templates(["a photo"])
    (tmp_path / "t.txt").write_text("a {} photo\n", encoding="utf-8")
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a {} photo"]


def test_cli_reports_bad_input(tiny_ckpt, tmp_path, capsys) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok\n\xff\xfe\n")
    rc = embed_main([str(f), "-o", str(tmp_path / "o.pth"), "--weights", str(tiny_ckpt),
                   "--device", "cpu", "--no-progress"])
    assert rc == 2 and "bad.txt, line 2" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
