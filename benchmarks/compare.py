"""Every CPU execution path of whole-image detection side by side, in one run: seconds per image, agreement with
float32 eager, and the region head's fraction of this machine's measured float32 GEMM peak.

Rows (paths): ``original procedure`` (the unfused float32 model, all regions in one region-head call, no work
skipping: what the original computes, on our modules; the in-run baseline), ``fp32 torch`` (the default: fused
model, chunked head, exact work skipping), ``fp32 onnxruntime`` / ``fp32 openvino`` (exported graphs through the
same pipeline), ``int8 onnxruntime`` (static int8 region head), ``bf16 trusted`` (``--dtype bfloat16``: layer4 in bf16, then the
regions that decide the detections encoded again in float32, docs/DESIGN.md#cpu-speed) and ``bf16 scan only`` (the
same without the refinement) - both only where the CPU has native bf16, else "skipped" rows. Settings: RN50 / RN50x4 x {GT: the parity anchor's 6-8 hand-placed boxes, RPN-1000 with
the random RPN, RPN-1000 with the RPN shifted to mostly negative logits (what a trained RPN gives background)}, the
``lvis-rpn`` preset (NMS 0.9, 1000 proposals, raw-logit multiplication, score > 0.02 - the zero-shot RPN preset),
65 random classes. Weights: random official-format checkpoints (tests/conftest.py::random_checkpoints; speed does
not depend on the values). Input: the bundled 1920x1080 demo image, resized to 1333x750 as the original does.

Columns: ``s/img`` = ``Pipeline.detect_prepared`` (RPN, trunk, region head, classify, post-processing; decoding
excluded), median of ``--repeats`` runs after one warm-up; ``speed-up`` against the original-procedure row;
``encoded`` = regions through the head (work skipping drops unreachable ones); ``head s`` = time inside
``encode_regions``; ``%peak`` = FLOPs the head executes per region (torch's FlopCounterMode on the module that
runs: unfused for the original procedure, fused otherwise) x regions / head time / peak, where the peak is the best
of a 2048^3 ``torch.mm`` and a large 1x1 convolution (oneDNN), measured before and after the table (the max is
used); ``agree`` = of the reference's (original procedure's) detections, the share that the row also reports with
the same class from the same source region / with the same class at box IoU >= 0.5.

The original itself (microsoft/RegionCLIP) is not built here; issue 17 measured it on the same kind of machine
(2-core AVX2 x86, same checkpoints and inputs): the ``vs orig`` column divides those figures by this run's s/img.

    python benchmarks/compare.py --quick          # RN50 only, 1 timed run (~10 min on 2 idle cores)
    python benchmarks/compare.py                  # RN50 + RN50x4 (~40 min on 2 idle cores)
    python benchmarks/compare.py --chunk-sweep 16 32 64 128 256   # fused RN50 head regions/s vs chunk size
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# issue 17's measurement of the original (seconds per image, 2-core AVX2 x86, torch current, 2 threads)
ORIGINAL_S = {("rn50", "gt"): 3.62, ("rn50", "rpn"): 57.5, ("rn50x4", "gt"): 7.35, ("rn50x4", "rpn"): 158.6}
SETTINGS = ("gt", "rpn", "rpn-negative")
RPN_SHIFT = -0.95  # the shared generator's objshift: 70-87 % of the random RPN's 1000 proposals get logits < 0


def measured_peak() -> float:
    """Best float32 GEMM throughput (GFLOP/s) of this torch on this CPU: max(2048^3 mm, big 1x1 oneDNN conv)."""
    from regionclip.inference.hardware import gemm_peak_gflops

    x = torch.randn(1, 1024, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1).contiguous(memory_format=torch.channels_last)
    F.conv2d(x, w)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        F.conv2d(x, w)
        best = min(best, time.perf_counter() - t)
    return max(gemm_peak_gflops.__wrapped__(torch.float32), 2 * 64 * 64 * 1024 * 1024 / best / 1e9)


def head_gflop(backbone: Any) -> float:
    """FLOPs one region's layer4 + attnpool executes on this module (fused or not), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    p = 2 * backbone.attnpool.spacial_dim
    x = torch.zeros(1, backbone.res4_channels, p, p)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        backbone.forward_res5_pooled(x)
    return fc.get_total_flops() / 1e9


class TimedRecognizer:
    """Delegates to a recognizer and accumulates the seconds and regions spent in ``encode_regions``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.regions = inner, 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_regions(self, features: torch.Tensor, boxes: Sequence[torch.Tensor], **kw: Any) -> Any:
        t = time.perf_counter()
        out = self.inner.encode_regions(features, boxes, **kw)
        self.seconds += time.perf_counter() - t
        self.regions += sum(len(b) for b in boxes)
        return out


def gt_boxes(image_name: str) -> torch.Tensor:
    """The parity anchor's hand-placed boxes of one demo image, XYXY original pixels."""
    from conftest import SHARED

    data = json.loads((SHARED / "parity" / "gt_boxes.json").read_text())
    img = next(i for i in data["images"] if i["file_name"] == image_name)
    xywh = torch.tensor([a["bbox"] for a in data["annotations"] if a["image_id"] == img["id"]], dtype=torch.float32)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)


def agreement(ref: Any, det: Any) -> str:
    """'same class+source region / same class at IoU >= 0.5' over the reference's detections."""
    from torchvision.ops import box_iou

    if len(ref.scores) == 0:
        return "  (none)"
    b = set(zip(det.region_index.tolist(), det.labels.tolist()))
    src = sum(x in b for x in zip(ref.region_index.tolist(), ref.labels.tolist())) / len(ref.scores)
    iou = ((box_iou(ref.boxes, det.boxes) >= 0.5) & (ref.labels[:, None] == det.labels[None])).any(1)
    return f"{100 * src:5.1f}/{100 * iou.float().mean().item():5.1f}"


def load_paths(variant: str, export_root: Path) -> dict[str, Any]:
    """Models (per RPN kind) and per-path pipelines of one variant; the exported graphs are written here."""
    from conftest import random_checkpoints

    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.cli.export import calibration_data
    from regionclip.export import export_model, make_backend
    from regionclip.inference.hardware import native_bf16
    from regionclip.text.vocabulary import Vocabulary

    out: dict[str, Any] = {}
    for kind, shift in (("rpn", 0.0), ("rpn-negative", RPN_SHIFT)):
        ck = random_checkpoints(variant, 0, rpn_objectness_shift=shift)
        fused = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], preset="lvis-rpn")
        orig = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], preset="lvis-rpn", fuse=False)
        vocab = Vocabulary.create(torch.load(ck["concept_emb"], weights_only=True).float(),
                                  embed_dim=fused.detector.embed_dim)
        exp = export_root / f"{variant}_{kind}"
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # ONNX Runtime's calibrator prints its progress
            export_model(fused.detector, exp, fmt="onnx", int8=True, weights_path=ck["regionclip"],
                         calibration=calibration_data(fused, demo_image_paths()))
        print(f"[{variant} {kind}] exported + int8 calibrated in {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
        paths: dict[str, Any] = {"original procedure": orig.detector, "fp32 torch": fused.detector,
                                 "fp32 onnxruntime": make_backend(fused, "onnxruntime", exp)}
        try:
            paths["fp32 openvino"] = make_backend(fused, "openvino", exp)
        except ImportError as e:
            paths["fp32 openvino"] = f"skipped ({e})"
        paths["int8 onnxruntime"] = make_backend(fused, "onnxruntime", exp, int8=True)
        skip = "skipped: bf16 is emulated on this CPU (~7x slower than float32; regionclip never picks it here)"
        paths["bf16 trusted"] = fused.detector if native_bf16("cpu") else skip
        paths["bf16 scan only"] = fused.detector if native_bf16("cpu") else skip
        out[kind] = {"paths": paths, "vocab": vocab, "fused": fused, "orig": orig}
    return out


def run_variant(variant: str, repeats: int, export_root: Path, peak_ref: list[float]) -> list[str]:
    from regionclip.assets import demo_image_paths
    from regionclip.pipeline import Pipeline

    env = load_paths(variant, export_root)
    flops = {"original procedure": head_gflop(env["rpn"]["orig"].detector.backbone),
             "fused": head_gflop(env["rpn"]["fused"].detector.backbone)}
    image = demo_image_paths()[0]
    rows = []
    for setting in SETTINGS:
        e = env["rpn-negative" if setting == "rpn-negative" else "rpn"]
        model = e["fused"]
        cfg = model.pipeline.input_cfg
        base_opts = model.run_options()
        prepared = [model.pipeline.prepare(image)]
        regions = None
        if setting == "gt":
            regions = [model.pipeline.user_regions(gt_boxes(image.name), prepared[0])]
        ref, t_ref = None, None
        for name, rec in e["paths"].items():
            if isinstance(rec, str):
                rows.append(f"{variant:7s} {setting:13s} {name:18s} {rec}")
                print(rows[-1], flush=True)
                continue
            timed = TimedRecognizer(rec)
            pipe = Pipeline(timed, cfg)  # type: ignore[arg-type]
            if name == "original procedure":
                opts = model.run_options(chunk_size=100_000, skip_unreachable=False)
            elif name == "bf16 trusted":  # --dtype bfloat16: layer4 scan in bf16 + float32 refinement
                opts = model.run_options(dtype="bfloat16")
            elif name == "bf16 scan only":  # the same without the refinement (not offered by --dtype auto)
                opts = replace(model.run_options(dtype="bfloat16"), refine_float32=False)
            else:
                opts = base_opts

            # warm-up (kernel / session initialisation), not timed; on 64 proposals (the cost is per shape)
            warm = opts if setting == "gt" else replace(opts, max_proposals=64)
            pipe.detect_prepared(prepared, e["vocab"], warm, regions=regions)
            times, head_s, encoded = [], [], 0
            for _ in range(repeats):
                timed.seconds, timed.regions = 0.0, 0
                t = time.perf_counter()
                det = pipe.detect_prepared(prepared, e["vocab"], opts, regions=regions)[0]
                times.append(time.perf_counter() - t)
                head_s.append(timed.seconds)
                encoded = timed.regions
            s = statistics.median(times)
            hs = statistics.median(head_s)
            if ref is None:
                ref, t_ref = det, s
            fl = flops["original procedure" if name == "original procedure" else "fused"]
            frac = "    -" if name.startswith("int8") or hs <= 0 else \
                f"{100 * fl * encoded / hs / max(peak_ref):4.0f}%"
            orig = ORIGINAL_S.get((variant, "gt" if setting == "gt" else "rpn"))
            rows.append(f"{variant:7s} {setting:13s} {name:18s} {s:8.2f} {t_ref / s:7.2f}x "
                        f"{(orig / s if orig else float('nan')):7.2f}x {encoded:7d} {hs:8.2f} {frac:>6s}  "
                        f"{agreement(ref, det)}")
            print(rows[-1], flush=True)
    return rows


def chunk_sweep(chunks: list[int], repeats: int) -> list[str]:
    """Fused RN50 head (layer4 + attnpool, float32) regions/s as a function of the chunk size."""
    from conftest import random_checkpoints

    from regionclip.api import RegionCLIP

    ck = random_checkpoints("rn50", 0)
    bb = RegionCLIP.from_pretrained(ck["regionclip"]).detector.backbone
    rows = ["chunk  regions  regions/s  ms/region"]
    x = torch.randn(256, bb.res4_channels, 14, 14)
    with torch.inference_mode():
        res: dict[int, list[float]] = {c: [] for c in chunks}
        for c in chunks:
            bb.forward_res5_pooled(x[:c])  # warm-up
        for _ in range(repeats):  # interleaved: load changes hit every chunk size alike
            for c in chunks:
                t = time.perf_counter()
                for s in range(0, len(x), c):
                    bb.forward_res5_pooled(x[s:s + c])
                res[c].append(time.perf_counter() - t)
        for c in chunks:
            t = min(res[c])
            rows.append(f"{c:5d} {len(x):8d} {len(x) / t:10.2f} {1000 * t / len(x):10.2f}")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="RN50 only, 1 timed run")
    ap.add_argument("--variants", nargs="+", default=None, choices=["rn50", "rn50x4"])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row, median (default 2, --quick 1)")
    ap.add_argument("--chunk-sweep", type=int, nargs="*", default=None, metavar="C",
                    help="only measure fused RN50 head throughput for these chunk sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file (atomically)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging_quiet()

    from regionclip.inference.hardware import cpu_capabilities, cpu_flags_line

    repeats = args.repeats or (1 if args.quick else 2)
    peaks = [measured_peak()]
    lines = [f"# regionclip benchmarks/compare.py, torch {torch.__version__}, {platform.machine()}, "
             f"{platform.processor() or ''} load average {os.getloadavg()[0]:.1f} at start",
             "# command: python benchmarks/compare.py " + " ".join(sys.argv[1:]),
             "# " + cpu_flags_line(cpu_capabilities()),
             f"# float32 GEMM peak measured before the table: {peaks[0]:.1f} GFLOP/s ({torch.get_num_threads()} "
             "threads; best of torch.mm 2048^3 and a 1x1 conv 1024->1024 on 64x64)"]
    print("\n".join(lines), flush=True)
    if args.chunk_sweep is not None:
        rows = chunk_sweep(args.chunk_sweep or [16, 32, 64, 128, 256], repeats)
    else:
        header = ("variant setting       path                  s/img speed-up vs orig encoded   head s  %peak  "
                  "agree src/IoU%")
        print(header, flush=True)
        rows = [header]
        with tempfile.TemporaryDirectory(prefix="regionclip-compare-") as tmp:
            for v in args.variants or (["rn50"] if args.quick else ["rn50", "rn50x4"]):
                rows += run_variant(v, repeats, Path(tmp), peaks)
        peaks.append(measured_peak())
        rows.append(f"# float32 GEMM peak measured after the table: {peaks[1]:.1f} GFLOP/s; %peak uses the max "
                    f"{max(peaks):.1f}; load average {os.getloadavg()[0]:.1f} at the end")
        rows.append("# vs orig: the original's s/img from issue 17 (RN50 3.62 GT / 57.5 RPN, RN50x4 7.35 / 158.6; "
                    "same machine kind, not re-run here) divided by this row's s/img")
        print("\n".join(rows[-2:]), flush=True)
    if args.out:
        from regionclip.utils import atomic_path

        with atomic_path(args.out) as tmp_out:
            Path(tmp_out).write_text("\n".join(lines + rows) + "\n")


def logging_quiet() -> None:
    """ONNX Runtime's quantiser logs advice on every call; the table is the output here."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
