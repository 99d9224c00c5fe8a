"""Export the heavy parts of a CLIP-ResNet RegionCLIP detector as standalone graphs (ONNX, OpenVINO IR, torch.export).

Three graphs, each a pure tensor function (docs/EXPORT.md):

* ``trunk``: the CLIP-normalised, zero-padded batch [B, 3, H, W] -> res4 [B, C4, H', W'] (stem..layer3, what
  :meth:`RegionCLIPDetector.compute_features` runs after :func:`~regionclip.modeling.detector.normalize_and_pad`);
  B, H, W dynamic.
* ``region_head``: res4 [B, C4, H', W'] + RoIs [R, 5] (batch index, x1, y1, x2, y2 in resized-image pixels) ->
  raw region embeddings [R, D] (RoIAlignV2 at 1/16 -> layer4 -> attnpool); B, H', W', R dynamic. torchvision's
  ``roi_align(aligned=True)`` becomes ONNX ``RoiAlign`` (opset >= 16) with
  ``coordinate_transformation_mode="half_pixel"``: the same -0.5 pixel shift (verified in tests/test_export.py).
* ``rpn`` (when the detector has an offline RPN): the RPN's own normalised, padded batch -> per level objectness
  logits [B, A, Hi, Wi] and anchor deltas [B, 4A, Hi, Wi]. Anchors, box decoding, top-k and NMS stay in torch
  (cheap, and they must match the eager ordering exactly).

The cheap float32 parts (normalisation, classification, box regression, NMS, masks) are not exported: the runtime
model (:mod:`regionclip.export.runtime`) delegates them to the torch detector.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..modeling.clip_resnet import ModifiedResNet
from ..modeling.detector import RES4_STRIDE, RegionCLIPDetector
from ..modeling.fusion import fused_for_inference
from ..modeling.rpn.model import OfflineRPN
from ..modeling.rpn.rpn_head import RPN, StandardRPNHead
from ..text.name_cache import checkpoint_fingerprint
from ..utils import atomic_path, require, write_json_atomic
from .quantize import quantize_region_head

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "torch-export")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ONNX_OPSET = 17  # RoiAlign-16 is the first with coordinate_transformation_mode (aligned=True semantics)
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------- graph modules
class TrunkGraph(nn.Module):
    """[B, 3, H, W] CLIP-normalised padded batch -> res4 [B, C4, H/16, W/16] (floor-divided)."""

    def __init__(self, detector: RegionCLIPDetector, backbone: Optional[ModifiedResNet] = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else detector.backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.forward_res4(images)


class RegionHeadGraph(nn.Module):
    """res4 [B, C4, H', W'] + rois [R, 5] -> raw region embeddings [R, D] (RoIAlignV2 -> layer4 -> attnpool)."""

    def __init__(self, detector: RegionCLIPDetector, backbone: Optional[ModifiedResNet] = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else detector.backbone
        self.pooler_resolution = int(detector.pooler_resolution)
        self.sampling_ratio = int(detector.sampling_ratio)

    def forward(self, res4: Tensor, rois: Tensor) -> Tensor:
        pooled = roi_align(res4, rois, output_size=self.pooler_resolution, spatial_scale=1.0 / RES4_STRIDE,
                           sampling_ratio=self.sampling_ratio, aligned=True)
        return self.backbone.forward_res5_pooled(pooled)


class RPNGraph(nn.Module):
    """The offline RPN's backbone + head: [B, 3, Hp, Wp] (its own normalisation, padded to its size divisibility)
    -> (logits level 0..L-1 [B, A, Hi, Wi], then deltas level 0..L-1 [B, 4A, Hi, Wi])."""

    def __init__(self, rpn: OfflineRPN) -> None:
        super().__init__()
        pg = cast(RPN, rpn.proposal_generator)
        self.backbone = rpn.backbone
        self.head = cast(StandardRPNHead, pg.rpn_head)
        self.in_features = list(pg.in_features)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        feats = self.backbone(images)
        logits, deltas = self.head([feats[f] for f in self.in_features])
        return tuple(logits) + tuple(deltas)


# ---------------------------------------------------------------------------------------------- fingerprints
def state_fingerprint(detector: RegionCLIPDetector) -> str:
    """sha256 identifying the weights an export was made from, so a runtime cannot silently pair graphs with
    another checkpoint's classifier / box head. 64 hex chars.

    It hashes what inference-time fusion (``fused_for_inference`` of the CLIP trunk and of the RPN: BN folding,
    channels_last) leaves unchanged: the attention pool's parameters (checkpoint-specific), the RPN's head,
    ``bbox_pred`` and ``mask_head``; so a fused and an unfused load of the same file have the same fingerprint.
    """
    parts: list[tuple[str, Tensor]] = []
    mods: tuple[tuple[str, Optional[nn.Module]], ...] = (("attnpool", detector.backbone.attnpool), ("rpn", _rpn_head(detector)),
                        ("bbox_pred", detector.bbox_pred), ("mask_head", detector.mask_head))
    for prefix, mod in mods:
        if mod is not None:
            parts += [(f"{prefix}.{k}", v) for k, v in mod.state_dict().items()]
    h = hashlib.sha256()
    for name, t in sorted(parts, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _rpn_head(detector: RegionCLIPDetector) -> Optional[nn.Module]:
    """The RPN's head (its BN-free, checkpoint-specific part), or the whole RPN module if it is not an OfflineRPN."""
    rpn = detector.rpn
    return rpn.proposal_generator if isinstance(rpn, OfflineRPN) else rpn


def _check_detector(detector: Any) -> RegionCLIPDetector:
    if not isinstance(detector, RegionCLIPDetector):
        raise TypeError(f"export supports the CLIP-ResNet RegionCLIPDetector, got {type(detector).__name__} "
                        "(transformer checkpoints are not exportable yet: run them with --backend torch)")
    if detector.device.type != "cpu":
        raise ValueError(f"export from a CPU model (got one on {detector.device}): load it with device='cpu'")
    return detector


def _example_inputs(detector: RegionCLIPDetector) -> dict[str, tuple[Tensor, ...]]:
    """Small example inputs for tracing: sizes are dynamic in the exported graphs, so any valid ones do."""
    c4 = cast(nn.Conv2d, cast(nn.Module, detector.backbone.layer4[0]).conv1).in_channels
    g = torch.Generator().manual_seed(0)
    rois = torch.tensor([[0.0, 4.0, 6.0, 100.0, 90.0], [1.0, 0.0, 0.0, 127.0, 95.0], [0.0, 30.0, 20.0, 34.5, 22.0]])
    # batch 2: torch.export specialises a dimension whose example size is 1
    return {"trunk": (torch.randn(2, 3, 96, 128, generator=g),),
            "region_head": (torch.randn(2, c4, 6, 8, generator=g), rois),
            "rpn": (torch.randn(2, 3, 128, 160, generator=g),)}


def _graph_specs(detector: RegionCLIPDetector) -> dict[str, dict[str, Any]]:
    """Per graph: module, input/output names and their dynamic axes (also written to the manifest).

    The CLIP graphs are traced from a fused copy of the backbone (BNs folded, the attnpool's K/V projections
    folded into its single query: ~20x fewer attnpool FLOPs; exact up to float rounding, ~1e-6 relative) in NCHW
    (the runtimes choose their own layouts); ``detector`` itself is not changed."""
    bb = detector.backbone
    fused = fused_for_inference(bb, channels_last=False)  # also takes an already fused (channels_last) trunk
    specs: dict[str, dict[str, Any]] = {
        "trunk": {"module": TrunkGraph(detector, fused), "inputs": {"images": ["batch", 3, "height", "width"]},
                  "outputs": {"res4": ["batch", "res4_channels", "res4_height", "res4_width"]}},
        "region_head": {"module": RegionHeadGraph(detector, fused),
                        "inputs": {"res4": ["batch", "res4_channels", "res4_height", "res4_width"],
                                   "rois": ["regions", 5]},
                        "outputs": {"embeddings": ["regions", detector.embed_dim]}},
    }
    if isinstance(detector.rpn, OfflineRPN):
        rpn = detector.rpn
        levels = len(cast(RPN, rpn.proposal_generator).in_features)
        outs = {f"logits_{i}": ["batch", "anchors", f"h{i}", f"w{i}"] for i in range(levels)}
        outs.update({f"deltas_{i}": ["batch", "anchors_x4", f"h{i}", f"w{i}"] for i in range(levels)})
        specs["rpn"] = {"module": RPNGraph(rpn), "inputs": {"images": ["batch", 3, "height", "width"]},
                        "outputs": outs}
    return specs


def _dynamic_axes(spec: dict[str, Any]) -> dict[str, dict[int, str]]:
    return {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
            for name, dims in {**spec["inputs"], **spec["outputs"]}.items()}


# ---------------------------------------------------------------------------------------------- exporters
def export_onnx_graph(module: nn.Module, example: tuple[Tensor, ...], spec: dict[str, Any], path: PathLike,
                      opset: int = ONNX_OPSET) -> Path:
    """One graph -> ``path`` (.onnx), atomically. Uses the TorchScript-based exporter: it has torchvision's
    RoiAlign symbolic and needs no onnxscript."""
    require("onnx", "onnx", "ONNX export")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # the legacy exporter warns that it is legacy, and the tracer about shape checks made in Python
        # (attnpool's grid-size check: the pooler resolution is fixed, so they are constant by design)
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(tmp), dynamo=False, opset_version=opset,
                          input_names=list(spec["inputs"]), output_names=list(spec["outputs"]),
                          dynamic_axes=_dynamic_axes(spec), do_constant_folding=True)
    return Path(path)


def export_torch_graph(module: nn.Module, example: tuple[Tensor, ...], spec: dict[str, Any],
                       path: PathLike) -> Path:
    """One graph -> ``path`` (.pt2, ``torch.export``) with dynamic sizes where the manifest says so."""
    dims: dict[str, Any] = {}
    shapes = []
    for dims_spec in spec["inputs"].values():
        shapes.append({i: dims.setdefault(d, torch.export.Dim.AUTO) for i, d in enumerate(dims_spec)
                       if isinstance(d, str)})
    with torch.no_grad():
        prog = torch.export.export(module.eval(), example, dynamic_shapes=tuple(shapes))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: save() wants a .pt2 name otherwise
        torch.export.save(prog, f)
    return Path(path)


def onnx_to_openvino(onnx_path: PathLike, xml_path: PathLike) -> Path:
    """Convert an exported .onnx graph to OpenVINO IR (.xml + .bin) with float32 weights."""
    ov = require("openvino", "openvino", "OpenVINO export")
    model = ov.convert_model(str(onnx_path))
    # compress_to_fp16 defaults to True in save_model: keep float32 weights so results match eager
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def export_model(detector: Any, output_dir: PathLike, *, fmt: str = "onnx", int8: bool = False,
                 include_rpn: bool = True, weights_path: Optional[PathLike] = None,
                 calibration: Optional[Sequence[tuple[Tensor, Tensor]]] = None, opset: int = ONNX_OPSET
                 ) -> dict[str, Any]:
    """Export ``detector``'s trunk, region head and (if any) offline RPN into ``output_dir`` + ``manifest.json``.

    Args:
        detector: a CPU :class:`RegionCLIPDetector` (or a :class:`~regionclip.api.RegionCLIP`: its ``.detector``).
        fmt: ``onnx`` | ``openvino`` (IR converted from the ONNX graphs) | ``torch-export`` (.pt2).
        int8: also write an int8 region head (ONNX Runtime post-training quantisation; onnx format only).
        include_rpn: export the RPN graph when the detector has one.
        weights_path: the checkpoint file, recorded in the manifest.
        calibration: (res4 [1, C4, H, W], rois [R, 5]) pairs for static int8 calibration; None -> dynamic int8.
    Returns: the manifest (also written to ``output_dir/manifest.json``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ValueError("--int8 is implemented with ONNX Runtime quantisation: use --format onnx")
    det = _check_detector(getattr(detector, "detector", detector))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = _graph_specs(det)
    if not include_rpn:
        specs.pop("rpn", None)
    examples = _example_inputs(det)
    graphs: dict[str, Any] = {}
    was_training = det.training
    det.eval()
    try:
        for name, spec in specs.items():
            if fmt == "torch-export":
                file = export_torch_graph(spec["module"], examples[name], spec, out / f"{name}.pt2")
            else:
                file = export_onnx_graph(spec["module"], examples[name], spec, out / f"{name}.onnx", opset)
                if fmt == "openvino":
                    onnx_file = file
                    file = onnx_to_openvino(onnx_file, out / f"{name}.xml")
                    onnx_file.unlink()
            graphs[name] = {"file": file.name, "inputs": spec["inputs"], "outputs": spec["outputs"]}
            logger.info("exported %s -> %s", name, file)
    finally:
        det.train(was_training)
    if int8:
        q = quantize_region_head(out / graphs["region_head"]["file"], out / "region_head.int8.onnx", calibration)
        graphs["region_head_int8"] = {**graphs["region_head"], "file": q["file"], "quantization": q["method"]}
    manifest = _manifest(det, fmt, graphs, weights_path, opset)
    write_json_atomic(manifest, out / MANIFEST, indent=2)
    return manifest


def _manifest(det: RegionCLIPDetector, fmt: str, graphs: dict[str, Any], weights_path: Optional[PathLike],
              opset: int) -> dict[str, Any]:
    rpn_info = None
    if "rpn" in graphs and isinstance(det.rpn, OfflineRPN):
        pg = cast(RPN, det.rpn.proposal_generator)
        rpn_info = {"in_features": list(pg.in_features), "strides": list(pg.strides),
                    "size_divisibility": int(det.rpn.size_divisibility), "input_format": det.rpn.cfg.input_format}
    return {
        "manifest_version": MANIFEST_VERSION, "format": fmt, "opset": opset if fmt != "torch-export" else None,
        "graphs": graphs,
        "model": {"kind": "clip-resnet", "embed_dim": det.embed_dim, "pooler_resolution": det.pooler_resolution,
                  "sampling_ratio": det.sampling_ratio, "spatial_scale": 1.0 / RES4_STRIDE,
                  "pixel_mean": det.pixel_mean.flatten().tolist(), "pixel_std": det.pixel_std.flatten().tolist(),
                  "rpn": rpn_info},
        "fingerprint": {"state_sha256": state_fingerprint(det),
                        "weights_file": str(weights_path) if weights_path is not None else None,
                        "weights_file_fingerprint": checkpoint_fingerprint(weights_path)
                        if weights_path is not None and Path(weights_path).exists() else None},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
