"""detectron2 Box2BoxTransform semantics of regionclip.ops.box_coder."""
from __future__ import annotations

import math

import pytest
import torch

from regionclip.ops.box_coder import DEFAULT_SCALE_CLAMP, decode_boxes, encode_boxes


def test_decode_by_hand() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # w 10, h 20, centre (5, 10)
    deltas = torch.tensor([[0.1, 0.2, math.log(2.0), 0.0]])
    # centre -> (5 + 0.1 * 10, 10 + 0.2 * 20) = (6, 14); size -> (20, 20)
    out = decode_boxes(deltas, boxes)
    torch.testing.assert_close(out, torch.tensor([[-4.0, 4.0, 16.0, 24.0]]))


def test_decode_weights_divide_deltas() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    plain = decode_boxes(torch.tensor([[0.1, 0.2, 0.3, -0.4]]), boxes)
    weighted = decode_boxes(torch.tensor([[1.0, 2.0, 1.5, -2.0]]), boxes, weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(plain, weighted)


def test_decode_multiple_boxes_per_row_layout() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 7.0]])
    d0 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    d1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(3.0), 0.0]])
    both = decode_boxes(torch.cat([d0, d1], dim=1), boxes)
    assert both.shape == (2, 8)
    torch.testing.assert_close(both[:, :4], decode_boxes(d0, boxes))
    torch.testing.assert_close(both[:, 4:], decode_boxes(d1, boxes))
    torch.testing.assert_close(both[0, 4:], torch.tensor([10.0, 0.0, 20.0, 10.0]))  # shifted by one width
    torch.testing.assert_close(both[1, 4:], torch.tensor([1.0, 5.0, 13.0, 7.0]))  # width 4 -> 12


def test_decode_clamps_scale_only_from_above() -> None:
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    big = decode_boxes(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), boxes)
    # exp(log(1000/16)) * 16 = 1000 (up to float rounding of the clamp value)
    torch.testing.assert_close(big, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]), rtol=0, atol=1e-3)
    assert abs(DEFAULT_SCALE_CLAMP - math.log(1000 / 16)) < 1e-12
    # Not clamped from below: a box centred on 0 keeps the tiny exp(-50) extent (exactly representable).
    small = decode_boxes(torch.tensor([[0.0, 0.0, -50.0, -50.0]]), torch.tensor([[-8.0, -8.0, 8.0, 8.0]]))
    w = small[0, 2] - small[0, 0]
    assert 0 < w.item() < 1e-15
    assert abs(w.item() - 16 * math.exp(-50)) < 1e-3 * 16 * math.exp(-50)


def test_decode_is_float32_for_half_input() -> None:
    out = decode_boxes(torch.zeros(2, 4, dtype=torch.float16), torch.tensor([[0.0, 0, 4, 4], [1.0, 1, 3, 5]]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, 0, 4, 4], [1.0, 1, 3, 5]]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights: tuple) -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 500
    src = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 200], dim=1)
    xy = torch.rand(50, 2, generator=g) * 500
    tgt = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 200], dim=1)
    deltas = encode_boxes(src, tgt, weights)
    assert deltas.shape == (50, 4)
    torch.testing.assert_close(decode_boxes(deltas, src, weights), tgt, rtol=0, atol=1e-3)
    # identity: a box encoded against itself gives zero deltas
    torch.testing.assert_close(encode_boxes(src, src, weights), torch.zeros(50, 4))


def test_encode_by_hand() -> None:
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    tgt = torch.tensor([[-4.0, 4.0, 16.0, 24.0]])
    torch.testing.assert_close(encode_boxes(src, tgt), torch.tensor([[0.1, 0.2, math.log(2.0), 0.0]]))
    torch.testing.assert_close(encode_boxes(src, tgt, (10.0, 10.0, 5.0, 5.0)),
                               torch.tensor([[1.0, 2.0, 5 * math.log(2.0), 0.0]]))


def test_encode_rejects_degenerate_source() -> None:
    with pytest.raises(ValueError):
        encode_boxes(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
