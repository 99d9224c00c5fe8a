"""Batched multi-image inference: size bucketing, worker decoding, batched == unbatched, 16-bit autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _region_helpers import random_boxes, tiny_detector, write_images
from regionclip.data.loader import batch_by_size, items_from_inputs, make_loader
from regionclip.engine.extract import ExtractConfig, autocast_context, extract_batch

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
def test_loader_decodes_like_detector_prepare(tmp_path, workers: int) -> None:
    det = tiny_detector()
    write_images(tmp_path, [(90, 140), (120, 80), (64, 64)])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = items_from_inputs([tmp_path])
    got = list(make_loader(items, det.input_cfg, num_workers=workers))
    assert [g.index for g in got] == list(range(4))
    assert got[0].error and "broken.png" in got[0].error  # sorted first; reported, not raised
    for g in got[1:]:
        ref = det.prepare(items[g.index].file_name)
        assert torch.equal(g.prepared.image, ref.image)
        assert g.prepared.original_hw == ref.original_hw and g.prepared.resized_hw == ref.resized_hw


@pytest.fixture(scope="module")
def same_size(tmp_path_factory):
    det = tiny_detector(seed=2, rpn=True)
    paths = write_images(tmp_path_factory.mktemp("same"), [(90, 140)] * 3, seed=4)
    prepared = [det.prepare(p) for p in paths]
    boxes = [random_boxes(17 + 5 * i, 90, 140, seed=i) for i in range(3)]
    return det, prepared, boxes


@pytest.mark.parametrize("regions", ["boxes", "rpn", "detections"])
def test_batched_equals_one_at_a_time(same_size, regions: str) -> None:
    det, prepared, boxes = same_size
    vocab = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    cfg = ExtractConfig(regions=regions, topk=30, chunk_size=8)
    kw = dict(class_embeddings=vocab)
    batched = extract_batch(det, prepared, cfg, boxes=boxes if regions == "boxes" else None, **kw)
    single = [extract_batch(det, [p], ExtractConfig(regions=regions, topk=30, chunk_size=10**6),
                            boxes=[b] if regions == "boxes" else None, **kw)[0] for p, b in zip(prepared, boxes)]
    for a, b in zip(batched, single):
        assert a.keys() == b.keys() and len(a["feats"]) > 0
        for k in a:
            if a[k].is_floating_point():
                tol = F32_BOXES if k in ("boxes", "objectness") and regions != "boxes" else F32
                torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{regions}/{k}: {m}")
            else:
                assert torch.equal(a[k], b[k]), k


def test_bfloat16_autocast_on_cpu_is_close_and_float16_needs_gpu(same_size) -> None:
    det, prepared, boxes = same_size
    ref = extract_batch(det, prepared[:1], ExtractConfig(regions="boxes"), boxes=boxes[:1])[0]["feats"]
    low = extract_batch(det, prepared[:1], ExtractConfig(regions="boxes", dtype="bfloat16"), boxes=boxes[:1])[0]
    assert low["feats"].dtype == torch.float32  # stored in float32 whatever the compute dtype
    cos = F.cosine_similarity(ref, low["feats"], dim=1)
    print(f"tiny model bf16 vs fp32 region-embedding cosine: min {cos.min():.4f}")
    assert not torch.equal(ref, low["feats"])  # autocast really changed the compute dtype
    assert cos.min() > 0.95
    with pytest.raises(ValueError, match="bfloat16"):
        autocast_context(torch.device("cpu"), "float16")


def test_bfloat16_compute_dtype_keeps_classifier_float32(demo_images):
    """detect with compute_dtype bfloat16: outputs float32, close to float32 compute; classifier runs in float32."""
    import torch

    from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig
    from regionclip.factory import build_detector

    torch.manual_seed(0)
    det = build_detector(DetectorConfig(clip=ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=2,
                                                              image_resolution=64),
                                        input=InputConfig(min_size=64, max_size=128))).eval()
    det.set_vocabulary(torch.randn(3, 16), ["a", "b", "c"])
    boxes = [[[0, 0, 900, 700], [800, 100, 1900, 1000]]]
    ref = det.detect([demo_images[0]], boxes, keep_probs=True)[0]
    det.compute_dtype = "bfloat16"
    out = det.detect([demo_images[0]], boxes, keep_probs=True)[0]
    assert out.probs.dtype == torch.float32 and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.probs, ref.probs, atol=0.05, rtol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = det.classify(torch.randn(4, 16))
    assert probs.dtype == torch.float32
