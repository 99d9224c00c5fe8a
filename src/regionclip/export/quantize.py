"""Post-training int8 quantisation of the exported region head with ONNX Runtime (docs/EXPORT.md#int8).

Two methods:

* ``static`` (when calibration regions are given): QDQ format, int8 per-channel weights, uint8 activations whose
  ranges come from running the float32 graph on a few (res4, RoIs) pairs (99.999th percentile of the observed
  values). Only the convolutions are quantised (they are ~99 % of the folded head's FLOPs); the attention pool's
  small products stay float32. Measured on RN50 (random weights, 1000 RPN proposals, top-100 detections against
  float32 eager; benchmarks/int8_variants.py, docs/EXPORT.md#int8): all op types + MinMax ranges: same (class,
  source proposal) 71 %, same class at box IoU >= 0.5 93 %; convs only + MinMax: 71 % / 97 %; convs only +
  99.999th percentile (the default): 81 % / 96 %.
* ``dynamic`` (no calibration data): int8 weights, activation ranges computed per call (``quantize_dynamic``).
  No data needed, but ONNX Runtime's dynamic ``ConvInteger`` path is not its fast one, so on CPUs it may be slower
  than float32 (measured: benchmarks/results/export_cpu.txt).

Only the region head is quantised: it is ~90% of the work at 1000 regions per image; the trunk and the RPN stay
float32 (the RPN's boxes must stay exact).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..utils import atomic_path, require

PathLike = Union[str, os.PathLike]
DEFAULT_OP_TYPES = ("Conv",)
CALIBRATION_PERCENTILE = 99.999


class _CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over (res4, rois) pairs (duck-typed: ``get_next`` / ``rewind``)."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self._items = [{"res4": r.detach().float().cpu().numpy(), "rois": b.detach().float().cpu().numpy()}
                       for r, b in pairs]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._items)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def calibration_pairs(res4_list: Sequence[Tensor], boxes_list: Sequence[Tensor], *, regions_per_call: int = 64,
                      max_calls: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """(res4 [1, C4, H, W], rois [<=regions_per_call, 5]) calibration pairs: per image, a random sample of its
    boxes (resized-frame XYXY, e.g. RPN proposals), at most ``max_calls`` pairs in all."""
    rng = random.Random(seed)
    pairs = []
    per_image = max(1, max_calls // max(1, len(res4_list)))
    for res4, boxes in zip(res4_list, boxes_list):
        idx = list(range(len(boxes)))
        for _ in range(per_image):
            pick = sorted(rng.sample(idx, min(regions_per_call, len(idx))))
            if not pick:
                continue
            b = boxes[pick].float().cpu()
            pairs.append((res4[:1], torch.cat([torch.zeros(len(pick), 1), b], dim=1)))
    return pairs[:max_calls]


def quantize_region_head(fp32_path: PathLike, int8_path: PathLike,
                         calibration: Optional[Sequence[tuple[Tensor, Tensor]]] = None, *,
                         op_types: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Write an int8 copy of the float32 region-head ONNX graph; ``calibration`` -> static QDQ, else dynamic.
    ``op_types``: the ONNX op types to quantise (default: ``Conv`` only, see the module docstring).

    Returns ``{"file": <int8 file name>, "method": "static-qdq-conv-percentile" | "dynamic"}``.
    """
    quant = require("onnxruntime.quantization", "onnx", "int8 quantisation")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    with atomic_path(int8_path) as tmp:
        if calibration:
            quant.quantize_static(str(fp32_path), str(tmp), _CalibrationReader(calibration),
                                  quant_format=quant.QuantFormat.QDQ, per_channel=True,
                                  activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                                  calibrate_method=quant.CalibrationMethod.Percentile,
                                  extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
                                  op_types_to_quantize=list(op_types or DEFAULT_OP_TYPES))
            method = "static-qdq-conv-percentile"
        else:
            quant.quantize_dynamic(str(fp32_path), str(tmp), weight_type=quant.QuantType.QInt8,
                                   op_types_to_quantize=list(op_types or DEFAULT_OP_TYPES))
            method = "dynamic"
    return {"file": int8_path.name, "method": method}
