"""Text towers of both families come from one builder (factory.load_text_tower), lazily, through one embed path
(text.name_cache.class_embeddings); the text dtype comes in resolved (issue 25)."""
from __future__ import annotations

import pytest
import torch
from test_transformer_zeroshot import tiny_detector as tiny_branch

import regionclip.api as api
from regionclip.factory import load_text_tower
from regionclip.factory.transformer import export_branch_state_dict
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.modeling.unicl_text import UniCLTextEncoder
from regionclip.text.embeddings import TEXT_DTYPES, PromptEncoder
from regionclip.utils import COMPUTE_DTYPES


def _branch_file(tmp_path):
    det, text = tiny_branch("vit")
    path = tmp_path / "vit.pth"
    torch.save(export_branch_state_dict(det, "vit", text_tower=text), path)
    return path


@pytest.mark.parametrize("family", ["resnet", "transformer"])
def test_embed_names_builds_the_text_tower_through_the_factory_only_on_a_miss(family, tiny_ckpt, tmp_path,
                                                                             monkeypatch) -> None:
    path = tiny_ckpt if family == "resnet" else _branch_file(tmp_path)
    model = api.RegionCLIP.from_pretrained(path)
    assert not hasattr(model.detector, "text_encoder")  # no detector holds its text tower
    built = []

    def counting(*args, **kwargs):
        built.append(args[0])
        return load_text_tower(*args, **kwargs)

    monkeypatch.setattr(api, "load_text_tower", counting)
    first = model.embed_names(["cat", "dog"], cache_dir=tmp_path / "cache")
    assert built == [path]
    again = model.embed_names(["dog", "cat"], cache_dir=tmp_path / "cache")  # every name cached: file not read
    assert built == [path] and torch.equal(again, first.flip(0))
    model.embed_names(["bird"], cache_dir=tmp_path / "cache")
    assert built == [path, path]


def test_load_text_tower_reads_either_family(tiny_ckpt, tmp_path) -> None:
    assert isinstance(load_text_tower(tiny_ckpt), CLIPTextTransformer)
    branch = load_text_tower(_branch_file(tmp_path))
    assert isinstance(branch, UniCLTextEncoder) and not branch.autoregressive  # the branch's ViT default
    assert load_text_tower(_branch_file(tmp_path), transformer_options={"autoregressive": True}).autoregressive
    with pytest.raises(ValueError, match="transformer options"):
        load_text_tower(tiny_ckpt, transformer_options={"autoregressive": True})


def test_text_dtype_comes_in_resolved() -> None:
    assert set(TEXT_DTYPES) < set(COMPUTE_DTYPES)  # one dtype table (utils), float16 not for the text tower
    enc = CLIPTextTransformer(width=64, heads=1, layers=1, embed_dim=16)
    with pytest.raises(ValueError, match="resolve_text_dtype"):
        PromptEncoder(enc, ["a {}."], dtype="auto")
