"""``regionclip export``: the CLIP-ResNet detector's heavy parts as ONNX / OpenVINO IR / torch.export graphs.

Example::

    regionclip export --weights regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_lvis_866.pth \\
        --format onnx -o export/rn50 --int8
    regionclip detect images/ --weights regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_lvis_866.pth \\
        --backend onnxruntime --export-dir export/rn50 [--int8]

Writes ``trunk``, ``region_head`` (dynamic number of regions) and, with an RPN, ``rpn`` (backbone + head; the
proposal selection stays in torch), plus ``manifest.json`` (input/output names and shapes, the checkpoint
fingerprint). ``--int8`` adds ``region_head.int8.onnx`` (ONNX Runtime post-training quantisation, calibrated on
the RPN proposals of ``--calibration-images``, default the bundled demo images). See docs/EXPORT.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..api import RegionCLIP
from ..assets import demo_image_paths
from ..export import FORMATS, ONNX_OPSET, calibration_pairs, export_model
from ..inference.presets import LoadOptions
from ..pipeline import RunOptions
from .common import log

NAME = "export"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(NAME, help="export the detector to ONNX / OpenVINO / torch.export for fast runtimes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="RegionCLIP CLIP-ResNet checkpoint (path or released name)")
    p.add_argument("--rpn-weights", help="offline RPN checkpoint: also export its backbone + head")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="onnx",
                   help="onnx (onnxruntime/openvino backends, default), openvino (IR .xml/.bin), torch-export (.pt2)")
    p.add_argument("-o", "--output", required=True, help="output folder (graphs + manifest.json)")
    p.add_argument("--int8", action="store_true", help="also write an int8 region head (onnx format)")
    p.add_argument("--int8-method", choices=("static", "dynamic"), default="static",
                   help="static: calibrated on regions of --calibration-images (fast integer kernels, default); "
                        "dynamic: no calibration (ONNX Runtime's dynamic conv path is slow on CPUs)")
    p.add_argument("--calibration-images", nargs="*", default=None,
                   help="images whose RPN proposals (or random boxes without an RPN) calibrate --int8 "
                        "(default: the bundled demo images)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset, >= 16 (default {ONNX_OPSET})")
    p.add_argument("--non-strict", action="store_true", help="load checkpoints with missing/unexpected keys")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def calibration_data(model: RegionCLIP, images: list[Path], *, regions_per_call: int = 64, max_calls: int = 8,
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(res4, rois) pairs for static int8 calibration: each image's res4 with a sample of its RPN proposals
    (random boxes when the model has no RPN), computed with the eager float32 model."""
    pipe, opts = model.pipeline, RunOptions()
    res4s, boxes = [], []
    gen = torch.Generator().manual_seed(0)
    for path in images:
        prep = [pipe.prepare(path)]
        res4s.append(pipe.features(prep, opts))
        if model.detector.rpn is not None:
            boxes.append(pipe.proposals(prep, opts)[0].boxes)
        else:
            h, w = prep[0].resized_hw
            xy = torch.rand(256, 2, generator=gen) * torch.tensor([w * 0.9, h * 0.9])
            wh = torch.rand(256, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6]) + 8.0
            boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h], dtype=xy.dtype))], dim=1))
    return calibration_pairs(res4s, boxes, regions_per_call=regions_per_call, max_calls=max_calls)


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the process exit code."""
    if args.opset < 16:
        print(f"regionclip {NAME}: error: --opset must be >= 16 (RoiAlign half_pixel), got {args.opset}",
              file=sys.stderr)
        return 2
    if args.int8 and args.fmt != "onnx":
        print(f"regionclip {NAME}: error: --int8 needs --format onnx (ONNX Runtime quantisation)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = RegionCLIP.load(LoadOptions.create(args.weights, args.rpn_weights, device="cpu",
                                               strict=not args.non_strict,
                                               regions="rpn" if args.rpn_weights else "gt"))
    log(model.loaded.report.summary(max_items=4))
    calib = None
    if args.int8 and args.int8_method == "static":
        files = [Path(p) for p in args.calibration_images] if args.calibration_images else demo_image_paths()
        log(f"int8 calibration on {len(files)} image(s)")
        calib = calibration_data(model, files)
    manifest = export_model(model.detector, args.output, fmt=args.fmt, int8=args.int8, calibration=calib,
                            weights_path=model.weights_path, opset=args.opset)
    for name, g in manifest["graphs"].items():
        log(f"  {name:17s} {g['file']:24s} inputs {g['inputs']}")
    print(f"exported {', '.join(manifest['graphs'])} ({args.fmt}) to {args.output} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
