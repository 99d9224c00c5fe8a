"""RegionPredictor: cached res4, box encoding / classification / detection, chunking, attnpool shortcut."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _region_helpers import random_boxes, tiny_model, write_images
from regionclip.modeling.clip_resnet import AttentionPool2d
from regionclip.predictor import RegionPredictor
from regionclip.text.vocabulary import Vocabulary


def _full_mha_attnpool(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's AttentionPool2d.forward verbatim: all HW+1 queries through F.multi_head_attention_forward,
    then token 0."""
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


@pytest.mark.parametrize("grid,embed,heads,out_dim", [(2, 32, 4, 16), (7, 256, 4, 64), (9, 160, 5, 40)])
def test_attnpool_first_query_matches_full_mha(grid: int, embed: int, heads: int, out_dim: int) -> None:
    torch.manual_seed(grid)
    pool = AttentionPool2d(grid, embed, heads, out_dim).eval()
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            lin.bias.normal_(std=0.1)
        x = torch.randn(5, embed, grid, grid) * 3
        ours, ref = pool(x), _full_mha_attnpool(pool, x)
    assert ours.shape == (5, out_dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model(seed=1, rpn=True)
    path = write_images(tmp_path_factory.mktemp("pred"), [(90, 140)], seed=3)[0]
    pred = RegionPredictor(model).set_image(path)
    boxes = random_boxes(23, 90, 140, seed=5)
    return model, path, pred, boxes, torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def test_requires_image() -> None:
    with pytest.raises(RuntimeError, match="set_image"):
        RegionPredictor(tiny_model()).encode_boxes([[0, 0, 10, 10]])


def test_encode_boxes_matches_detector_and_keeps_order(setup) -> None:
    model, path, pred, boxes, _ = setup
    det, pipe = model.detector, model.pipeline
    emb = pred.encode_boxes(boxes)
    prepared = pipe.prepare(path)
    with torch.no_grad():
        ref, _ = det.encode_regions(det.compute_features([prepared.image]),
                                    [pipe.user_regions(boxes, prepared).boxes], chunk_size=256)
    assert emb.shape == (23, 16) and emb.dtype == torch.float32
    assert torch.equal(emb, ref)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pred.encode_boxes(boxes[perm]), emb[perm], rtol=1e-6, atol=1e-7)
    normed = pred.encode_boxes(boxes, normalize=True)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(23))
    torch.testing.assert_close(normed, F.normalize(emb, dim=-1))
    assert pred.encode_boxes([]).shape == (0, 16)


def test_chunked_equals_unchunked(setup) -> None:
    # equal up to float32 rounding: oneDNN picks its conv blocking by batch size, so a chunk of 1 and of 23 regions
    # may sum in another order (a few ulp); every region is still computed independently of the others
    _, _, pred, boxes, _ = setup
    full = pred.encode_boxes(boxes, chunk_size=10_000)
    for chunk in (1, 5, 22):
        torch.testing.assert_close(pred.encode_boxes(boxes, chunk_size=chunk), full, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, chunk=chunk: f"chunk {chunk}: {m}")


def test_roi_head_never_sees_more_than_a_chunk(setup) -> None:
    model, _, _, _, _ = setup
    det = model.detector
    pred = RegionPredictor(model, chunk_size=16)
    pred.set_image(torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8))
    seen: list[int] = []
    handle = det.backbone.layer4.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        out = pred.encode_boxes(random_boxes(100, 96, 128, seed=2))
    finally:
        handle.remove()
    assert out.shape == (100, 16)
    assert seen == [16] * 6 + [4]


def test_classify_boxes_equals_gt_mode_detection(setup) -> None:
    model, path, pred, boxes, vocab = setup
    cls = pred.classify_boxes(boxes, (["a", "b", "c", "d"], vocab))
    assert cls.probs.shape == (23, 5) and len(cls) == 23
    torch.testing.assert_close(cls.probs.sum(1), torch.ones(23))
    assert torch.equal(cls.labels, cls.probs[:, :-1].argmax(1))
    assert torch.equal(cls.scores, cls.probs[cls.labels.new_tensor(range(23)), cls.labels])
    assert set(cls.names) <= {"a", "b", "c", "d"}
    # GT-mode detection of the same boxes: its probs / features rows are those of the boxes they came from
    dets = model.detect([path], [boxes], vocabulary=Vocabulary.create(vocab), keep_probs=True,
                        keep_features=True)[0]
    assert len(dets) > 0
    assert torch.equal(dets.probs, cls.probs[dets.region_index])
    assert torch.equal(dets.features, pred.encode_boxes(boxes)[dets.region_index])


def test_detect_reuses_cached_features(setup) -> None:
    model, path, pred, boxes, vocab = setup
    det = model.detector
    calls: list[int] = []
    handle = det.backbone.layer1.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours = pred.detect(vocab)
        ours_gt = pred.detect(vocab, boxes=boxes)
    finally:
        handle.remove()
    assert calls == []  # the backbone did not run again
    ref = model.detect([path], vocabulary=Vocabulary.create(vocab))[0]
    ref_gt = model.detect([path], [boxes], vocabulary=Vocabulary.create(vocab))[0]
    for a, b in ((ours, ref), (ours_gt, ref_gt)):
        assert len(a) == len(b) > 0
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_vocabulary_errors(setup) -> None:
    model, _, pred, boxes, _ = setup
    with pytest.raises(ValueError, match="text encoder"):
        pred.classify_boxes(boxes, ["cat", "dog"])  # a model without a weights file has no text encoder
    with pytest.raises(ValueError, match="8-d but this model's region embeddings are 16-d"):
        pred.classify_boxes(boxes, torch.randn(3, 8))
    with pytest.raises(ValueError, match="no vocabulary set"):
        pred.classify_boxes(boxes)
    model.set_vocabulary(["x", "y"], torch.randn(2, 16))
    try:
        assert pred.classify_boxes(boxes).class_names == ["x", "y"]
    finally:
        model.vocabulary = None


@pytest.mark.slow
def test_rn50_predictor_chunking_and_gt_detection(rn50_ckpts, demo_images) -> None:
    from regionclip.api import RegionCLIP

    model = RegionCLIP.from_pretrained(rn50_ckpts["regionclip"], regions="gt")
    pred = RegionPredictor(model).set_image(demo_images[0])
    h, w = pred.original_size
    boxes = random_boxes(300, h, w, seed=0)
    full = pred.encode_boxes(boxes, chunk_size=300)
    chunked = pred.encode_boxes(boxes, chunk_size=64)
    print(f"RN50 chunked vs unchunked max |diff| = {(full - chunked).abs().max().item():.3g}")
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    vocab = torch.load(rn50_ckpts["concept_emb"], weights_only=True)
    dets = model.detect([demo_images[0]], [boxes], vocabulary=model.make_vocabulary(class_embeddings=vocab),
                        keep_features=True, keep_probs=True, score_thresh=0.001)[0]
    assert len(dets) > 0
    assert torch.equal(dets.features, full[dets.region_index])
    assert torch.equal(dets.probs, pred.classify_boxes(boxes, vocab).probs[dets.region_index])
