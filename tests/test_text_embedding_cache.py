"""Fast class-embedding computation (batched across names, shared template prefixes, EOT-cut tails) equals the
original one-name-at-a-time procedure; the per-name cache is written as it goes, survives Ctrl-C, and never
holds NaN/inf rows."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import regionclip.factory as factory_mod
import regionclip.text.name_cache as name_cache
from regionclip.modeling.text_encoder import CLIPTextTransformer, PrefixedTokens
from regionclip.text.embeddings import PromptEncoder, concept_embeddings
from regionclip.text.prompts import build_prompts, default_templates
from regionclip.text.tokenizer import default_tokenizer
from regionclip.text.name_cache import _name_key, cached_name_embeddings


def class_embeddings(names, ckpt, **kw):
    """The name cache with the factory's text tower of ``ckpt`` as its lazy loader (what embed_names passes)."""
    return name_cache.class_embeddings(names, ckpt, lambda: factory_mod.load_text_tower(ckpt), **kw)

NAMES = ["person", "hot+dog, food", "{curly} name", "naïve café", "traffic cone", "a", "very " * 40 + "long",
         "bat animal", "x-ray machine", "teddy bear"]
# 81 RegionCLIP templates plus ones whose prefix does not tokenize on its own ("{}" glued to a word or first)
TEMPLATES = default_templates() + ["itap of a{}.", "{} in the wild", "a photo of a {}-like thing", "{}{}"]


def _tiny_encoder(seed: int = 0, width: int = 64, heads: int = 2, layers: int = 3) -> CLIPTextTransformer:
    torch.manual_seed(seed)
    enc = CLIPTextTransformer(width=width, heads=heads, layers=layers, embed_dim=32)
    with torch.no_grad():
        for p in enc.parameters():  # no zero biases / unit LayerNorms that could hide a wrong position
            p.add_(torch.randn_like(p) * 0.05)
    return enc.eval()


def _one_name_per_batch(enc: CLIPTextTransformer, names: list[str], templates: list[str]) -> torch.Tensor:
    """The old procedure: each name's prompts as one [T, 77] batch (full padding), mean over templates."""
    tok = default_tokenizer()
    with torch.no_grad():
        return torch.stack([enc.encode_text(tok(build_prompts(n, templates))).mean(0) for n in names])


def _tiny_ckpt(path: Path, seed: int = 0, nan: bool = False) -> Path:
    enc = _tiny_encoder(seed, heads=1, layers=2)
    if nan:
        with torch.no_grad():
            enc.text_projection[0, 0] = float("nan")
    torch.save({"model": {"lang_encoder." + k: v for k, v in enc.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def old_result() -> torch.Tensor:
    return _one_name_per_batch(_tiny_encoder(), NAMES, TEMPLATES)


@pytest.mark.parametrize("batch_size", [29, 1024])  # 29: batches straddle names
def test_batched_across_names_equals_one_name_per_batch(batch_size: int, old_result: torch.Tensor) -> None:
    enc, ref = _tiny_encoder(), old_result
    with pytest.warns(UserWarning, match="truncated like the original"):  # the "{}{}" prompt of the long name
        ours = concept_embeddings(NAMES, enc, templates=TEMPLATES, batch_size=batch_size)
    scale = ref.abs().max().item()
    print(f"batch {batch_size}: max |fast - old| = {(ours - ref).abs().max().item():.2e} (max |value| {scale:.2f})")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def test_template_prefixes_are_shared_only_where_tokens_match() -> None:
    enc = _tiny_encoder()
    pe = PromptEncoder(enc, TEMPLATES)
    long_name = "very " * 40 + "long"
    tails, shared, too_long = pe._tails(["traffic cone", long_name])
    tok = default_tokenizer()
    for i, (tail, p) in enumerate(zip(tails, shared)):
        name, template = ["traffic cone", long_name][i // len(TEMPLATES)], TEMPLATES[i % len(TEMPLATES)]
        full = tok([template.replace("{}", name.replace(",", "").replace("+", " "))])[0].tolist()
        pooled = full.index(max(full))
        assert full[:p] == pe.prefix_ids[i % len(TEMPLATES)][:p]  # the shared part really is the template's
        assert full[p:pooled + 1] == tail  # the tail runs to the pooled token, nothing after it
    assert too_long == [long_name]  # through "{}{}" only: its pooled token is not an EOT
    assert shared[TEMPLATES.index("a photo of a {}.")] == 5  # SOT a photo of a
    assert shared[TEMPLATES.index("{}.")] == 1  # SOT only


def test_eot_cut_and_prefix_states_are_exact() -> None:
    """Dropping positions after the pooled token, and starting from precomputed prefix keys/values, both give
    encode_text on the full 77-token rows up to float rounding (causal mask); shared lengths 0..pooled."""
    enc = _tiny_encoder(seed=3, width=128, heads=4)
    tok = default_tokenizer()
    texts = ["a photo of a dog.", "a photo of a big red cat.", "there is a car in the scene.", "x", "word " * 90]
    full = tok(texts)
    pooled = full.argmax(-1)
    with torch.no_grad():
        ref = enc.encode_text(full)
        cut = enc.encode_text(full[:, :int(pooled.max()) + 1])
        torch.testing.assert_close(cut, ref, rtol=1e-5, atol=1e-5)
        # prefixes = the rows themselves; share 0, 1, ..., pooled tokens of them
        states = enc.encode_prefixes(full[:, :int(pooled.max()) + 1], pooled + 1)
        # (the truncated last row has no EOT: its largest id is the SOT, so it can share nothing)
        for wanted in ([0] * 5, [1] * 5, pooled.tolist(), [2, 5, 3, 1, 40]):
            shared = [min(w, int(p)) for w, p in zip(wanted, pooled)]  # the pooled token stays in the tail
            shared_t = torch.tensor(shared)
            tails = torch.zeros(5, 77, dtype=torch.long)
            for b in range(5):
                tail = full[b, shared[b]:int(pooled[b]) + 1]
                tails[b, :len(tail)] = tail
            out = enc.encode_text(PrefixedTokens(tails, states, torch.arange(5), shared_t))
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"shared lengths {shared}")


def _counting(compute_rows, fail_on_call: int | None = None, exc: type[BaseException] = KeyboardInterrupt):
    """A compute function returning compute_rows(names), recording every call; raises on call fail_on_call."""
    calls: list[list[str]] = []

    def compute(names: list[str]) -> torch.Tensor:
        calls.append(list(names))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise exc()
        return compute_rows(names)

    return compute, calls


def _rows(names: list[str]) -> torch.Tensor:
    return torch.stack([torch.full((4,), float(len(n))) + torch.arange(4.0) for n in names])


def test_interrupted_run_keeps_finished_rows_and_rerun_computes_the_rest(tmp_path) -> None:
    names = [f"name {i}" for i in range(10)]
    cache = tmp_path / "c.safetensors"
    compute, calls = _counting(_rows, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the 3rd chunk
        cached_name_embeddings(names, cache, compute, chunk_size=3, show_progress=True)
    assert [len(c) for c in calls] == [3, 3, 3]
    saved = load_file(str(cache))
    assert set(saved) == {_name_key(n) for n in names[:6]}  # both finished chunks were written
    compute, calls = _counting(_rows)
    out = cached_name_embeddings(names, cache, compute, chunk_size=3)
    assert calls == [names[6:9], names[9:]]  # only the missing names
    assert torch.equal(out, _rows(names))
    compute, calls = _counting(_rows)
    assert torch.equal(cached_name_embeddings(names[::-1], cache, compute), _rows(names[::-1])) and calls == []


def test_rows_reach_the_file_while_computing(tmp_path) -> None:
    """A killed process (no finally) keeps what was written: with save_interval_s=0, before chunk k starts the
    file already holds every earlier chunk."""
    names = [f"n{i}" for i in range(7)]
    cache = tmp_path / "c.safetensors"
    on_disk: list[int] = []

    def compute(part: list[str]) -> torch.Tensor:
        on_disk.append(len(load_file(str(cache))) if cache.exists() else 0)
        return _rows(part)

    cached_name_embeddings(names, cache, compute, chunk_size=2, save_interval_s=0)
    assert on_disk == [0, 2, 4, 6]


def test_class_embeddings_interrupted_inside_the_encoder(tmp_path, monkeypatch) -> None:
    """KeyboardInterrupt raised by the text tower after k forward passes: the finished chunks are cached, the
    rerun encodes only the other names' prompts, and the result equals an uninterrupted run."""
    ckpt = _tiny_ckpt(tmp_path / "tiny.pth")
    names = [f"thing number {i}" for i in range(9)]
    templates = ["a photo of a {}.", "a {} in the scene.", "{}"]
    kw = dict(templates=templates, batch_size=4, cache_dir=tmp_path / "cache")  # chunk = 16 // 3 + 1 = 6 names
    prompts: list[int] = []
    fail_after = {"passes": 6}
    real = factory_mod.load_text_tower

    def loader(*args, **kwargs):
        enc = real(*args, **kwargs)
        encode = enc.encode_text

        def counted(tokens, normalize=False):
            if len(prompts) == fail_after["passes"]:
                raise KeyboardInterrupt
            prompts.append(tokens.shape[0])
            return encode(tokens, normalize)

        enc.encode_text = counted
        return enc

    monkeypatch.setattr(factory_mod, "load_text_tower", loader)
    with pytest.raises(KeyboardInterrupt):
        class_embeddings(names, ckpt, **kw)
    # chunk 1 (6 names = 18 prompts = passes of 4, 4, 4, 4, 2) finished; chunk 2 was stopped in its 2nd pass
    assert prompts == [4, 4, 4, 4, 2, 4]
    prompts.clear()
    fail_after["passes"] = -1
    resumed = class_embeddings(names, ckpt, **kw)
    assert sum(prompts) == 3 * 3  # only the 3 names that were missing
    whole = class_embeddings(names, ckpt, templates=templates, use_cache=False)
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-6)


def test_non_finite_rows_are_rejected_and_never_served(tmp_path) -> None:
    names = ["ok 1", "ok 2", "bad", "ok 3"]
    cache = tmp_path / "c.safetensors"

    def rows(part: list[str]) -> torch.Tensor:
        out = _rows(part)
        out[[i for i, n in enumerate(part) if n == "bad"], 1] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"'bad'.*computed with the text encoder of model\.pth is not finite"):
        cached_name_embeddings(names, cache, rows, chunk_size=2, source="the text encoder of model.pth")
    saved = load_file(str(cache))
    assert set(saved) == {_name_key("ok 1"), _name_key("ok 2")}  # the chunk before is kept, nothing NaN
    # a NaN row in a file (an older version, another tool) is dropped on read and recomputed
    saved[_name_key("ok 1")] = torch.full((4,), float("inf"))
    save_file(saved, str(cache))
    compute, calls = _counting(_rows)
    out = cached_name_embeddings(["ok 1", "ok 2"], cache, compute)
    assert calls == [["ok 1"]] and torch.isfinite(out).all()


def test_class_embeddings_names_the_checkpoint_of_a_nan_row(tmp_path) -> None:
    ckpt = _tiny_ckpt(tmp_path / "broken.pth", nan=True)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"'car'.*broken\.pth is not finite"):
            class_embeddings(["car"], ckpt, templates="zeroshot", cache_dir=tmp_path / "c", use_cache=use_cache)
    assert not list((tmp_path / "c").glob("*.safetensors"))  # nothing was cached
