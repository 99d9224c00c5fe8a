"""Comparisons of our outputs with the original's stored parity outputs, tolerant of float rounding only.

The references were written on one CPU; another CPU (or the same one with other SIMD kernels: AVX-512 vs AVX2 vs
scalar) rounds float32 sums differently. The original itself, rerun on an AVX2 machine, differs from its own
stored outputs by up to ~1e-3 px on boxes and ~1e-5 on scores, and RPN proposals whose objectness logits are a
few 1e-7 apart swap places. Every tolerance below is derived from the noise measured in docs/PARITY_NOISE.md
(``tests/parity/_measure_noise.py``): the largest difference seen over all kernel settings, times a safety
factor of about 10, rounded up. Anything beyond rounding noise (a wrong op, a wrong constant, a box-coder or
resize slip) moves these quantities by orders of magnitude more.

What stays exact: shapes, final detection classes and their order (in GT mode and RPN mode), and the region
each detection comes from (in RPN mode through the proposal matching, since tied proposals may swap rows).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# ---------------------------------------------------------------- tolerances (see docs/PARITY_NOISE.md)
# Each is ~10x the largest difference measured between our outputs on an AVX2-only CPU and the stored references
# (written with AVX-512 kernels), rounded up; the original itself shows the same differences on AVX2.
# res4 (values up to ~13): measured |diff| <= 2.1e-5 (scale-relative 1.6e-6).
RES4_ATOL, RES4_RTOL = 2e-4, 1e-5
# Raw region embeddings (attnpool output, values up to ~22): measured |diff| <= 1.3e-5 in GT mode, <= 2.2e-4 in
# RPN mode (there the ~1e-3 px proposal-box noise also moves RoIAlign's sample points).
EMB_ATOL, EMB_RTOL = 2e-3, 1e-4
# L2 norms of all 1000 raw RPN-mode region embeddings (~100-210): measured |diff| <= 1.3e-3 (relative 6.4e-6).
EMB_NORM_ATOL, EMB_NORM_RTOL = 1e-2, 5e-5
# L2-normalized GT-mode embeddings (values up to ~0.11): measured |diff| <= 1.2e-7 (relative 1.1e-6).
EMB_UNIT_ATOL, EMB_UNIT_RTOL = 2e-6, 1e-5
# Class probabilities (softmax of cos/0.01, up to ~0.87): measured |diff| <= 1.7e-6 (GT), <= 1.9e-5 (RPN mode).
PROB_ATOL, PROB_RTOL = 2e-4, 1e-4
# Final scores (probabilities, or sqrt(p * raw logit) in RPN mode): measured |diff| <= 7.5e-6, as the original's
# own AVX2 rerun (5.4e-6 / 7.5e-6).
SCORE_ATOL, SCORE_RTOL = 1e-4, 1e-4
# Boxes in pixels (RPN proposals in the resized frame, final boxes in the original frame, up to 1920 px):
# measured |diff| <= 1.5e-3 px (final boxes 1.2e-3 / 7.7e-4 px, as the original's own AVX2 rerun). GT-mode
# boxes are exact (integer GT boxes, no regression). Real slips (half-pixel offsets, scale) are >= 0.1 px.
BOX_ATOL = 2e-2
# RPN objectness logits (|logit| <= ~1.5) at the same proposal: measured |diff| <= 4.1e-6.
LOGIT_ATOL = 5e-5
# Proposals whose logits are closer than this may come out in either order: 6 proposals per image changed rows
# on AVX2 (consecutive logit gaps down to 6e-8, 402 of 999 gaps below 1e-4); 1e-4 is ~25x the logit noise, and
# the box (within BOX_ATOL) still identifies each proposal.
LOGIT_TIE = 1e-4


def diff_stats(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    """(max |a - e|, max |a - e| / max |e|): absolute and scale-relative difference of two same-shape tensors."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    d = float((a - e).abs().max())
    scale = float(e.abs().max())
    return d, (d / scale if scale > 0 else d)


def assert_close(name: str, actual: Tensor, expected: Tensor, atol: float, rtol: float) -> None:
    """``torch.testing.assert_close`` (|a - e| <= atol + rtol |e|, float32 compared) with the quantity's name."""
    torch.testing.assert_close(actual.detach().float().cpu(), expected.detach().float().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def assert_boxes_close(name: str, boxes: Tensor, ref_boxes: Tensor, atol: float = BOX_ATOL) -> None:
    """Boxes [N, 4] in pixels agree to ``atol`` px everywhere (same rows, same order)."""
    d, _ = diff_stats(boxes, ref_boxes)
    assert d <= atol, f"{name}: max |box diff| {d:.3g} px > {atol:g} px"


def assert_res4_match(res4: Tensor, ref: dict) -> None:
    """res4 [1, C, H, W] against the stored shape, first 16 channels and per-channel means."""
    assert list(res4.shape) == list(ref["res4_shape"]), f"res4 shape {list(res4.shape)} != {ref['res4_shape']}"
    assert_close("res4[:16]", res4[0, :16], ref["res4_first16ch"], RES4_ATOL, RES4_RTOL)
    assert_close("res4 channel means", res4[0].mean((1, 2)), ref["res4_channel_mean"], RES4_ATOL, RES4_RTOL)


def match_proposals(boxes: Tensor, logits: Tensor, ref_boxes: Tensor, ref_logits: Tensor,
                    box_atol: float = BOX_ATOL, tie: float = LOGIT_TIE) -> Tensor:
    """Pair every reference proposal with one of ours: same box (within ``box_atol`` px) and a logit within ``tie``.

    Proposals come sorted by objectness; two whose logits differ by less than the rounding noise may come out in
    either order, so a proposal is looked up among our rows with a near-equal logit rather than at its own row.
    The pairing is a bipartite matching (augmenting paths), so boxes identical up to noise cannot be claimed twice.

    Args:
        boxes, logits: ours, [R, 4] and [R].
        ref_boxes, ref_logits: the original's, [R, 4] and [R].
    Returns:
        perm [R] int64: ``boxes[perm[i]]`` is the proposal of reference row ``i``.
    Raises:
        AssertionError naming the first reference rows that have no partner.
    """
    if boxes.shape != ref_boxes.shape or logits.shape != ref_logits.shape:
        raise AssertionError(f"proposal shapes {tuple(boxes.shape)}/{tuple(logits.shape)} != reference "
                             f"{tuple(ref_boxes.shape)}/{tuple(ref_logits.shape)}")
    b, lg = boxes.detach().double().cpu(), logits.detach().double().cpu()
    rb, rl = ref_boxes.detach().double().cpu(), ref_logits.detach().double().cpu()
    near_logit = (rl[:, None] - lg[None, :]).abs() <= tie  # [R_ref, R_ours]
    box_dist = (rb[:, None, :] - b[None, :, :]).abs().amax(dim=2)  # [R_ref, R_ours]
    ok = near_logit & (box_dist <= box_atol)
    n = rb.shape[0]
    # candidates of each reference row, the same row first, then by box distance
    cands = []
    for i in range(n):
        js = ok[i].nonzero().flatten().tolist()
        js.sort(key=lambda j, i=i: (j != i, float(box_dist[i, j])))
        cands.append(js)
    owner = [-1] * n  # owner[j] = reference row that holds our row j

    def augment(i: int, seen: set) -> bool:
        for j in cands[i]:
            if j in seen:
                continue
            seen.add(j)
            if owner[j] < 0 or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    unmatched = [i for i in range(n) if not augment(i, set())]
    if unmatched:
        i = unmatched[0]
        nearest = int(box_dist[i].argmin())
        raise AssertionError(
            f"{len(unmatched)} reference proposal(s) have no match among ours (same box within {box_atol:g} px and "
            f"logit within {tie:g}), first rows {unmatched[:5]}; row {i}: ref box {rb[i].tolist()} logit "
            f"{float(rl[i]):.7g}, our nearest box row {nearest} {b[nearest].tolist()} logit {float(lg[nearest]):.7g}")
    perm = torch.empty(n, dtype=torch.int64)
    for j, i in enumerate(owner):
        perm[i] = j
    return perm


def assert_proposals_match(boxes: Tensor, logits: Tensor, ref_boxes: Tensor, ref_logits: Tensor) -> Tensor:
    """RPN proposals equal the original's up to rounding, in the same order except among near-tied logits.

    Checks: same count; every reference proposal has a partner (:func:`match_proposals`); paired boxes within
    ``BOX_ATOL`` px and paired logits within ``LOGIT_ATOL``; our logits are sorted like the reference's (row by row
    within ``LOGIT_TIE``, i.e. at most near-tied rows changed places).

    Returns perm [R]: ``boxes[perm[i]]`` is reference proposal ``i`` (use it to align per-region outputs).
    """
    perm = match_proposals(boxes, logits, ref_boxes, ref_logits)
    assert_boxes_close("proposal boxes (paired)", boxes[perm], ref_boxes)
    assert_close("objectness logits (paired)", logits[perm], ref_logits, LOGIT_ATOL, 0.0)
    assert_close("objectness logits (row by row)", logits, ref_logits, LOGIT_TIE, 0.0)
    return perm


def assert_detections_match(boxes: Tensor, scores: Tensor, labels: Tensor, ref_boxes: Tensor, ref_scores: Tensor,
                            ref_labels: Tensor, *, region_index: Optional[Tensor] = None,
                            ref_region_index: Optional[Tensor] = None, region_perm: Optional[Tensor] = None) -> None:
    """Final detections: EXACTLY the same classes in the same order (and source regions), boxes/scores within noise.

    Order is kept exact on purpose (the issue's rule): no measured kernel setting reordered a detection. One near
    tie exists in the fixtures (RPN mode, sample_img2, ranks 37/38: scores 1.7e-6 apart, below the 7.5e-6 score
    noise; docs/PARITY_NOISE.md, "Near ties"); if some CPU swaps those two, this fails naming the position, and
    the fix is to allow swaps among detections whose reference scores are within SCORE_ATOL, not to loosen
    anything else.

    Args:
        boxes [N, 4], scores [N], labels [N]: ours; ref_*: the original's.
        region_index / ref_region_index [N]: source region rows, compared if both are given.
        region_perm [R]: from :func:`assert_proposals_match`; maps a reference region row to ours (RPN mode, where
            tied proposals may have swapped rows). None: the rows must be equal.
    """
    assert labels.shape == ref_labels.shape, f"{labels.shape[0]} detections, the original has {ref_labels.shape[0]}"
    bad = (labels.cpu() != ref_labels.cpu()).nonzero().flatten()
    assert bad.numel() == 0, (f"detection classes differ at {bad.numel()} position(s), first {int(bad[0])}: ours "
                              f"{labels[bad[:5]].tolist()} vs original {ref_labels[bad[:5]].tolist()}")
    if region_index is not None and ref_region_index is not None:
        expected = ref_region_index.cpu() if region_perm is None else region_perm[ref_region_index.cpu()]
        bad = (region_index.cpu() != expected).nonzero().flatten()
        assert bad.numel() == 0, (f"detections come from other regions at {bad.numel()} position(s): ours "
                                  f"{region_index[bad[:5]].tolist()} vs expected {expected[bad[:5]].tolist()}")
    assert_close("final scores", scores, ref_scores, SCORE_ATOL, SCORE_RTOL)
    assert_boxes_close("final boxes", boxes, ref_boxes)
