"""Caption data: the three storage formats give the same samples; text values, resize, flip, TSV sidecars."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pretrain_helpers import synthetic_pairs, write_jsonl, write_tar_shards, write_tsv
from torchvision.transforms.v2 import functional as TF

from regionclip.data.captions import (CaptionDataset, ConcatCaptions, TsvCaptions, caption_resized_shape,
                                      choose_caption, find_tsv_pairs, iter_captions, open_caption_source,
                                      parse_text_value, write_lineidx)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("captions")
    pairs = synthetic_pairs(6)
    jsonl = write_jsonl(tmp / "jsonl", pairs)
    write_tar_shards(tmp / "tar", pairs, per_shard=4)
    img_tsv, _ = write_tsv(tmp / "tsv", pairs)
    return pairs, {"jsonl": open_caption_source(jsonl), "tar": open_caption_source(tmp / "tar"),
                   "tsv": open_caption_source(img_tsv)}


def test_three_formats_round_trip_to_the_same_samples(formats):
    pairs, sources = formats
    for name, src in sources.items():
        assert len(src) == len(pairs), name
        assert sorted(src.key(i).rsplit("/", 1)[-1] for i in range(len(src))) == [k for k, _, _ in pairs]
    datasets = {n: CaptionDataset(s, min_size=64, max_size=96) for n, s in sources.items()}
    order = {n: {s.key(i).rsplit("/", 1)[-1]: i for i in range(len(s))} for n, s in sources.items()}
    for key, _img, cap in pairs:
        samples = {n: d[(order[n][key], 123)] for n, d in datasets.items()}
        ref = samples["jsonl"]
        assert ref.caption in (cap, cap.replace("a ", "one ", 1))
        for n, s in samples.items():
            assert torch.equal(s.image, ref.image), n  # same JPEG bytes, same seed -> same pixels and flip
            assert s.image.dtype == torch.uint8 and min(s.image.shape[1:]) == 64
        # the TSV rows carry two captions; the other formats one
        assert samples["tar"].caption == cap and torch.equal(samples["tar"].tokens, ref.tokens)


def test_samples_are_a_function_of_the_seed(formats):
    _, sources = formats
    ds = CaptionDataset(sources["tsv"], min_size=64, max_size=96)
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(a.image, b.image) and a.caption == b.caption
    flips = {bool(torch.equal(ds[(0, s)].image, ds[(0, 0)].image.flip(-1))) for s in range(12)}
    assert flips == {True, False}  # both flipped and unflipped versions occur


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (100, 1000), (333, 333), (1000, 97)])
def test_resize_follows_torchvision(hw):
    img = torch.zeros(3, *hw, dtype=torch.uint8)
    want = TF.resize(img, 800, max_size=1333, antialias=True).shape[-2:]
    assert caption_resized_shape(*hw, 800, 1333) == tuple(want)


def test_text_values():
    assert parse_text_value("a dog") == {"captions": ["a dog"]}
    assert parse_text_value("{not json") == {"captions": ["{not json"]}
    assert parse_text_value('["x", "y"]') == {"captions": ["x", "y"]}
    assert parse_text_value('{"tags": "cat sofa", "captions": ["c"]}') == {"captions": ["c"], "tags": ["cat", "sofa"]}
    with pytest.raises(ValueError, match="captions"):
        parse_text_value('{"other": 1}')
    rng = np.random.default_rng(0)
    caps = {choose_caption({"captions": [f"c{i}" for i in range(8)]}, rng, ["{}"]) for _ in range(200)}
    assert caps == {f"c{i}" for i in range(5)}  # only the first 5 captions are candidates
    tagged = choose_caption({"tags": ["cat", "sofa"]}, rng, ["a photo of {}."])
    assert tagged in ("a photo of cat sofa.", "a photo of sofa cat.")


def test_tsv_lineidx_linelist_and_errors(tmp_path):
    pairs = synthetic_pairs(3)
    img_tsv, txt_tsv = write_tsv(tmp_path, pairs)
    offsets = [int(x) for x in img_tsv.with_suffix(".lineidx").read_text().split()]
    with open(img_tsv, "rb") as f:
        for off, (key, _, _) in zip(offsets, pairs):
            f.seek(off)
            assert f.readline().split(b"\t")[0].decode() == key
    assert find_tsv_pairs(tmp_path) == [(img_tsv, txt_tsv)]
    img_tsv.with_suffix(".linelist").write_text("2\n0\n")
    txt_tsv.with_suffix(".linelist").write_text("2\n0\n")
    src = TsvCaptions(img_tsv, txt_tsv)
    assert [src.key(i) for i in range(len(src))] == [pairs[2][0], pairs[0][0]]
    # a text TSV whose rows are in another order is caught (the original asserts equal keys)
    lines = txt_tsv.read_text().splitlines()
    txt_tsv.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    write_lineidx(txt_tsv)
    with pytest.raises(ValueError, match="key"):
        TsvCaptions(img_tsv, txt_tsv).text(1)
    img_tsv.with_suffix(".lineidx").unlink()
    with pytest.raises(FileNotFoundError, match="lineidx"):
        TsvCaptions(img_tsv, txt_tsv)


def test_prepare_tsv_command_writes_the_sidecars(tmp_path, capsys):
    """``regionclip prepare-tsv`` (was the hidden ``python -m regionclip.data.captions``) writes each TSV's
    ``.lineidx`` (what :class:`TsvCaptions` reads) and prints its path; a sidecar or a missing file given as a TSV
    is refused, naming it, before anything is written."""
    from regionclip.cli.main import main

    pairs = synthetic_pairs(3)
    img_tsv, txt_tsv = write_tsv(tmp_path, pairs)
    want = [p.with_suffix(".lineidx").read_text() for p in (img_tsv, txt_tsv)]
    for p in (img_tsv, txt_tsv):
        p.with_suffix(".lineidx").unlink()
    assert main(["prepare-tsv", str(img_tsv), str(txt_tsv)]) == 0
    assert capsys.readouterr().out.split() == [str(img_tsv.with_suffix(".lineidx")), str(txt_tsv.with_suffix(".lineidx"))]
    assert [p.with_suffix(".lineidx").read_text() for p in (img_tsv, txt_tsv)] == want
    assert [TsvCaptions(img_tsv, txt_tsv).key(i) for i in range(3)] == [k for k, _, _ in pairs]

    idx = img_tsv.with_suffix(".lineidx")
    for bad, words in ((idx, "sidecar"), (tmp_path / "none.tsv", "no such TSV file")):
        idx.unlink()
        assert main(["prepare-tsv", str(img_tsv), str(bad)]) == 2
        err = capsys.readouterr().err
        assert words in err and str(bad) in err
        assert not idx.exists()  # the good file before it was not written either
        idx.write_text(want[0])


def test_iter_captions_and_concat(tmp_path, formats):
    _, sources = formats
    both = ConcatCaptions([sources["jsonl"], sources["tar"]])
    assert len(both) == 12 and both.key(6) == sources["tar"].key(0)
    txt = tmp_path / "caps.txt"
    txt.write_text("a cat\n\na dog\n")
    assert list(iter_captions(txt)) == ["a cat", "a dog"]
    text_tsv = tmp_path / "x.text.tsv"
    text_tsv.write_text("k1\t" + json.dumps({"captions": ["one", "two"], "tags": ["t1", "t2"]}) + "\n")
    assert list(iter_captions(text_tsv)) == ["one", "two", "t1 t2"]
    with pytest.raises(ValueError, match="unknown caption format"):
        open_caption_source(txt)
