"""The one vocabulary resolver (issue 25): every accepted shape goes through ``regionclip.text.vocabulary.resolve_vocabulary``,
and the front ends (``RegionCLIP.make_vocabulary``, ``RegionPredictor.vocabulary``) call it."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import regionclip
from regionclip.text import vocabulary as vocab_mod
from regionclip.api import RegionCLIP
from regionclip.predictor import RegionPredictor
from regionclip.text.vocabulary import Vocabulary, resolve_vocabulary

DIM = 8


def fake_text_tower(names: list[str]) -> torch.Tensor:
    """Deterministic non-zero rows per name (stands in for the checkpoint's text tower)."""
    return torch.stack([torch.full((DIM,), float(len(n) + 1)) + torch.arange(DIM) for n in names])


def resolve(v, emb=None, **kw):
    return resolve_vocabulary(v, emb, embed_names=fake_text_tower, embed_dim=DIM, model_name="tiny", **kw)


def test_names_list_comma_string_and_names_file_agree(tmp_path: Path) -> None:
    f = tmp_path / "names.txt"
    f.write_text("car\ntraffic cone\n")
    for arg in (["car", "traffic cone"], "car, traffic cone", str(f), f):
        v = resolve(arg)
        assert v.names == ("car", "traffic cone"), arg
        assert v.category_ids == (1, 2)
        torch.testing.assert_close(v.class_embeddings, fake_text_tower(["car", "traffic cone"]))
        assert v.source == "text embeddings of tiny"


@pytest.mark.parametrize("alias,k,first_id", [("coco65", 65, 1), ("COCO", 65, 1), ("lvis1203", 1203, 1),
                                              ("lvis", 1203, 1)])
def test_preset_aliases_get_their_dataset_ids(alias: str, k: int, first_id: int) -> None:
    v = resolve(alias)
    assert len(v) == k and v.category_ids[0] == first_id
    assert v.names == tuple(regionclip.parse_names(alias))


def test_coco65_keeps_coco_category_ids() -> None:
    v = resolve("coco65")
    assert max(v.category_ids) > 65  # COCO ids skip numbers (up to 90), not index + 1


def test_tensor_and_names_tensor_pair() -> None:
    emb = torch.randn(3, DIM)
    v = resolve(emb)
    assert v.names == ("0", "1", "2") and v.category_ids == (1, 2, 3)
    torch.testing.assert_close(v.class_embeddings, emb)
    v2 = resolve((["a", "b", "c"], emb))
    assert v2.names == ("a", "b", "c")
    v3 = resolve(["a", "b", "c"], emb)
    assert v3.names == ("a", "b", "c")
    with pytest.raises(ValueError, match="3 rows but the vocabulary has 2 names"):
        resolve(["a", "b"], emb)


def test_embedding_file_as_vocabulary_or_as_class_embeddings(tmp_path: Path) -> None:
    emb = torch.randn(2, DIM)
    f = tmp_path / "emb.pth"
    torch.save(emb, f)
    assert vocab_mod.is_embedding_file(f) and not vocab_mod.is_embedding_file("coco65")
    v = resolve(str(f))
    torch.testing.assert_close(v.class_embeddings, emb)
    assert v.names == ("0", "1") and str(f) in v.source
    assert resolve(["x", "y"], str(f)).names == ("x", "y")
    with pytest.raises(ValueError, match="is a tensor file, not class names"):
        resolve(str(f), emb)
    vocab_mod.check_vocabulary_arg(str(f))  # an embedding file: read later, with the model
    vocab_mod.check_vocabulary_arg(None)
    with pytest.raises(ValueError, match="empty name at position"):
        vocab_mod.check_vocabulary_arg("a,,b")
    with pytest.raises(ValueError, match="empty"):
        vocab_mod.check_vocabulary_arg(["a", " "])  # evaluate passes the dataset's names as a list
    with pytest.raises(FileNotFoundError, match="not found"):
        vocab_mod.check_vocabulary_arg(str(tmp_path / "missing.txt"))


def test_embeddings_without_names_take_the_default_vocabulary_when_rows_match() -> None:
    v = resolve(torch.randn(65, DIM), default_vocab="coco65")
    assert v.names == tuple(regionclip.parse_names("coco65"))
    assert resolve(torch.randn(3, DIM), default_vocab="coco65").names == ("0", "1", "2")


def test_defaults_vocabulary_passthrough_and_errors() -> None:
    assert resolve(None, default_vocab="a,b").names == ("a", "b")
    ready = resolve(["a"])
    assert resolve(ready) is ready
    with pytest.raises(ValueError, match="no vocabulary given"):
        resolve(None)
    with pytest.raises(ValueError, match="need a text encoder"):
        resolve_vocabulary(["a"])
    with pytest.raises(ValueError, match="empty name at position"):
        resolve("a,,b")
    with pytest.raises(ValueError, match="-d but this model"):
        resolve(torch.randn(2, DIM + 1))


def test_front_ends_go_through_the_one_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegionCLIP.make_vocabulary and RegionPredictor.vocabulary call regionclip.text.vocabulary.resolve_vocabulary."""
    calls = []

    def spy(v, emb=None, **kw):
        calls.append(v)
        return resolve_vocabulary(v, emb, **kw)

    monkeypatch.setattr("regionclip.api.resolve_vocabulary", spy)
    model = SimpleNamespace(detector=SimpleNamespace(embed_dim=DIM), weights_path=Path("tiny.pth"),
                            settings=SimpleNamespace(vocabulary="coco65"), vocabulary=None,
                            _default_embedding_file=lambda: None,
                            embed_names=lambda names, **kw: fake_text_tower(names))
    model.make_vocabulary = lambda *a, **kw: RegionCLIP.make_vocabulary(model, *a, **kw)  # type: ignore[attr-defined]
    v = RegionCLIP.make_vocabulary(model, "cat,dog")  # type: ignore[arg-type]
    assert v.names == ("cat", "dog") and calls == ["cat,dog"]
    pred = RegionPredictor.__new__(RegionPredictor)
    pred.model, pred._vocab_cache = model, {}  # type: ignore[assignment]
    emb = torch.randn(2, DIM)
    assert pred.vocabulary((["a", "b"], emb)).names == ("a", "b")
    assert pred.vocabulary(["cat", "dog"]) is pred.vocabulary(["cat", "dog"])  # names memoised per predictor
    assert len(calls) == 3
    assert isinstance(pred.vocabulary(v), Vocabulary)


def test_predictor_memo_tells_a_builtin_alias_from_a_one_name_list() -> None:
    """"coco65" is the 65-class built-in, ["coco65"] one class of that name: the per-predictor memo keeps them apart
    (it keyed both as ("coco65",) and answered the second with the first's 65 classes)."""
    model = SimpleNamespace(make_vocabulary=lambda v: resolve(v), require_vocabulary=lambda: resolve("a,b"))
    pred = RegionPredictor.__new__(RegionPredictor)
    pred.model, pred._vocab_cache = model, {}  # type: ignore[assignment]
    assert len(pred.vocabulary("coco65")) == 65
    assert pred.vocabulary(["coco65"]).names == ("coco65",)
    assert pred.vocabulary(None).names == ("a", "b")  # None: the model's current vocabulary


def test_defaults_are_looked_up_only_when_used_and_source_labels_errors() -> None:
    looked = []

    def default_file():
        looked.append(1)
        return torch.randn(65, DIM)

    assert resolve(["a"], default_vocab="coco65", default_embeddings=default_file).names == ("a",) and not looked
    assert len(resolve(None, default_vocab="coco65", default_embeddings=default_file)) == 65 and looked == [1]
    with pytest.raises(ValueError, match=r"^ft\.pth \(roi_heads.*all zeros"):
        resolve(torch.zeros(2, DIM), source="ft.pth (roi_heads.box_predictor embeddings)")

