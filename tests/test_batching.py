"""Batched multi-image inference: size bucketing, worker decoding, batched == unbatched, 16-bit autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _region_helpers import TINY_POST, random_boxes, tiny_pipeline, tiny_vocab, write_images
from regionclip.data.loader import batch_by_size, items_from_inputs, make_loader
from regionclip.engine.extract import ExtractConfig, extract_batch
from regionclip.pipeline import RunOptions
from regionclip.utils import autocast_context

# float32 "equal": oneDNN's conv blocking depends on the batch size, so a batch can differ from single images by a
# few ulp (measured ≤ 1e-7 here); no padding is involved because only equal sizes are batched
F32 = dict(rtol=1e-5, atol=1e-6)
# RPN boxes go through exp() of the (batched) head's deltas: the same few-ulp differences, in pixels
F32_BOXES = dict(rtol=1e-4, atol=1e-4)


def test_batch_by_size_groups_equal_sizes_and_keeps_every_item() -> None:
    sizes = ["a", "b", "a", "a", "c", "b", "a", "a", "b", "c"]
    batches = list(batch_by_size(range(len(sizes)), 3, lambda i: sizes[i]))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(sizes)))  # every item exactly once
    for b in batches:
        assert len(b) <= 3 and len({sizes[i] for i in b}) == 1
    assert [0, 2, 3] in batches  # full groups go out as soon as they fill


def test_batch_by_size_bounds_pending_items() -> None:
    sizes = list(range(100))  # all different: nothing ever fills a batch
    pending_max = 0
    seen = 0
    for b in batch_by_size(iter(range(100)), 4, lambda i: sizes[i], max_pending=6):
        seen += len(b)
        pending_max = max(pending_max, len(b))
    assert seen == 100 and pending_max == 1
    padded = list(batch_by_size(range(10), 4, lambda i: sizes[i], pad_mixed_sizes=True))
    assert [len(b) for b in padded] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_by_size(range(3), 0, lambda i: i))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_decodes_like_pipeline_prepare(tmp_path, workers: int) -> None:
    pipe = tiny_pipeline()
    write_images(tmp_path, [(90, 140), (120, 80), (64, 64)])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = items_from_inputs([tmp_path])
    got = list(make_loader(items, pipe.input_cfg, num_workers=workers))
    assert [g.index for g in got] == list(range(4))
    assert got[0].error and "broken.png" in got[0].error  # sorted first; reported, not raised
    for g in got[1:]:
        ref = pipe.prepare(items[g.index].file_name)
        assert torch.equal(g.prepared.image, ref.image)
        assert g.prepared.original_hw == ref.original_hw and g.prepared.resized_hw == ref.resized_hw


@pytest.fixture(scope="module")
def same_size(tmp_path_factory):
    pipe = tiny_pipeline(seed=2, rpn=True)
    paths = write_images(tmp_path_factory.mktemp("same"), [(90, 140)] * 3, seed=4)
    prepared = [pipe.prepare(p) for p in paths]
    boxes = [random_boxes(17 + 5 * i, 90, 140, seed=i) for i in range(3)]
    return pipe, prepared, boxes


def _user_regions(pipe, prepared, boxes):
    """Original-frame user boxes -> the resized-frame regions extract_batch takes (as Pipeline.iter_batches)."""
    return [pipe.user_regions(b, p) for b, p in zip(boxes, prepared)]


@pytest.mark.parametrize("regions", ["boxes", "rpn", "detections"])
def test_batched_equals_one_at_a_time(same_size, regions: str) -> None:
    pipe, prepared, boxes = same_size
    cfg = ExtractConfig(regions=regions, run=RunOptions(postprocess=TINY_POST, max_proposals=30, chunk_size=8))
    kw = dict(vocabulary=tiny_vocab(5, seed=3))
    batched = extract_batch(pipe, prepared, cfg,
                            regions=_user_regions(pipe, prepared, boxes) if regions == "boxes" else None, **kw)
    single = [extract_batch(pipe, [p], ExtractConfig(regions=regions, run=RunOptions(
                            postprocess=TINY_POST, max_proposals=30, chunk_size=10**6)),
                            regions=_user_regions(pipe, [p], [b]) if regions == "boxes" else None, **kw)[0]
              for p, b in zip(prepared, boxes)]
    for a, b in zip(batched, single):
        assert a.keys() == b.keys() and len(a["feats"]) > 0
        for k in a:
            if a[k].is_floating_point():
                tol = F32_BOXES if k in ("boxes", "objectness") and regions != "boxes" else F32
                torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{regions}/{k}: {m}")
            else:
                assert torch.equal(a[k], b[k]), k


def test_bfloat16_autocast_on_cpu_is_close_and_float16_needs_gpu(same_size) -> None:
    pipe, prepared, boxes = same_size
    regions = _user_regions(pipe, prepared[:1], boxes[:1])
    ref = extract_batch(pipe, prepared[:1], ExtractConfig(regions="boxes"), regions=regions)[0]["feats"]
    low = extract_batch(pipe, prepared[:1], ExtractConfig(regions="boxes", run=RunOptions(dtype="bfloat16")), regions=regions)[0]
    assert low["feats"].dtype == torch.float32  # stored in float32 whatever the compute dtype
    cos = F.cosine_similarity(ref, low["feats"], dim=1)
    print(f"tiny model bf16 vs fp32 region-embedding cosine: min {cos.min():.4f}")
    assert not torch.equal(ref, low["feats"])  # autocast really changed the compute dtype
    assert cos.min() > 0.95
    with pytest.raises(ValueError, match="bfloat16"):
        autocast_context(torch.device("cpu"), "float16")


def test_bfloat16_compute_dtype_keeps_classifier_float32(demo_images):
    """detect with RunOptions(dtype="bfloat16"): outputs float32, close to float32 compute; classifier in float32."""
    from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig
    from regionclip.factory import build_detector
    from regionclip.pipeline import Pipeline, RunOptions
    from regionclip.text.vocabulary import Vocabulary

    torch.manual_seed(0)
    input_cfg = InputConfig(min_size=64, max_size=128)
    det = build_detector(DetectorConfig(clip=ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=2,
                                                              image_resolution=64), input=input_cfg)).eval()
    pipe = Pipeline(det, input_cfg)
    vocab = Vocabulary.create(torch.randn(3, 16), ["a", "b", "c"], embed_dim=16)
    boxes = [[[0, 0, 900, 700], [800, 100, 1900, 1000]]]
    ref = pipe.detect([demo_images[0]], vocab, RunOptions(keep_probs=True), boxes=boxes)[0]
    out = pipe.detect([demo_images[0]], vocab, RunOptions(keep_probs=True, dtype="bfloat16"), boxes=boxes)[0]
    assert out.probs.dtype == torch.float32 and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.probs, ref.probs, atol=0.05, rtol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = det.classify(torch.randn(4, 16), vocab.class_embeddings)
    assert probs.dtype == torch.float32
