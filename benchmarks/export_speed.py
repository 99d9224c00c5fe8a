"""Speed of the exported runtimes (regionclip.export) against float32 eager torch, full-size RN50 on the CPU.

Settings: ``eager`` (torch float32, the fused model RegionCLIP.load builds), ``ort`` (ONNX Runtime float32),
``ort-int8`` (static int8 region head, calibrated on the demo images' RPN proposals), ``openvino`` (float32, when
installed). Random official-format RN50 + R50-FPN RPN checkpoints (tests/conftest.py::random_checkpoints; speed
does not depend on weight values). Timed per image:

* region head: ``encode_regions`` of N RPN proposals of sample_img1 (RoIAlign -> layer4 -> attnpool, chunks of
  256), reported per 1000 regions;
* whole-image detect: ``Pipeline.detect_prepared`` (RPN, trunk, region head, classify over 65 classes,
  post-processing) with ``max_proposals`` regions.

The settings run interleaved (A B C A B C ...) and the median is reported: the machine is shared and noisy.
``--agreement`` also compares int8 with float32 eager detections (1000 proposals, top-100, both demo images).

    python benchmarks/export_speed.py --quick       # 128 regions scaled to 1000, detect with 100 proposals
    python benchmarks/export_speed.py --agreement   # + int8 vs float32 detection agreement (slow on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def load(export_dir: Path) -> dict[str, Any]:
    """The eager RN50 pipeline, the backends over its export (exported on first use), vocabulary, demo images."""
    from conftest import random_checkpoints

    from regionclip.cli.export import calibration_data
    from regionclip.export import export_model, make_backend
    from regionclip.api import RegionCLIP
    from regionclip.pipeline import Pipeline
    from regionclip.text.vocabulary import Vocabulary

    ck = random_checkpoints("rn50", 0)
    model = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], regions="rpn",
                                       rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 1000})
    if not (export_dir / "manifest.json").exists():
        t = time.perf_counter()
        from regionclip.assets import demo_image_paths
        export_model(model.detector, export_dir, fmt="onnx", int8=True,
                     calibration=calibration_data(model, demo_image_paths()), weights_path=ck["regionclip"])
        print(f"exported to {export_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    cfg = model.pipeline.input_cfg
    pipes = {"eager": model.pipeline,
             "ort": Pipeline(make_backend(model, "onnxruntime", export_dir), cfg),
             "ort-int8": Pipeline(make_backend(model, "onnxruntime", export_dir, int8=True), cfg)}
    try:
        pipes["openvino"] = Pipeline(make_backend(model, "openvino", export_dir), cfg)
    except ImportError as e:
        print(f"openvino skipped: {e}")
    vocab = Vocabulary.create(torch.load(ck["concept_emb"], weights_only=True).float(),
                              embed_dim=model.detector.embed_dim)
    return {"pipes": pipes, "vocab": vocab, "model": model}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, A B C A B C ... (one warm-up call each first)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def speed(env: dict[str, Any], regions: int, detect_props: int, repeats: int) -> list[str]:
    from regionclip.assets import demo_image_paths
    from regionclip.config import PostprocessConfig
    from regionclip.pipeline import RunOptions

    pipes, vocab = env["pipes"], env["vocab"]
    eager = pipes["eager"]
    prep = [eager.prepare(demo_image_paths()[0])]
    props = eager.proposals(prep, RunOptions())[0]
    res4 = eager.features(prep, RunOptions())
    boxes = [props.boxes[:regions]]
    outs: dict[str, torch.Tensor] = {}

    def encoder(name: str, pipe: Any) -> Callable[[], Any]:
        def call() -> None:
            outs[name] = pipe.encode(res4, boxes, RunOptions())
        return call

    head = {k: encoder(k, p) for k, p in pipes.items()}
    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100,
                                                    rpn_score="raw"), max_proposals=detect_props)
    det = {k: (lambda p=p: p.detect_prepared(prep, vocab, opts)) for k, p in pipes.items()}
    lines = [f"image {prep[0].resized_hw[1]}x{prep[0].resized_hw[0]} (resized), {repeats} interleaved repeats, "
             "median [min-max] seconds"]
    th = interleaved(head, repeats)
    base = statistics.median(th["eager"])
    lines.append(f"region head, {len(boxes[0])} regions measured, scaled to per 1000 regions:")
    for k, ts in th.items():
        s = 1000 / len(boxes[0])
        lines.append(f"  {k:9s} {statistics.median(ts) * s:8.2f} s/1000 regions  [{min(ts) * s:.2f}-"
                     f"{max(ts) * s:.2f}]  speed-up vs eager {base / statistics.median(ts):.2f}x")
    ref = outs["eager"]
    for k, e in outs.items():
        if k != "eager":
            cos = torch.nn.functional.cosine_similarity(e, ref)
            top1 = (pipes["eager"].classify(e, vocab).argmax(1) == pipes["eager"].classify(ref, vocab).argmax(1))
            lines.append(f"  {k} vs eager on these regions: max |diff| / max |eager| "
                         f"{float((e - ref).abs().max() / ref.abs().max()):.2e}, cosine min {float(cos.min()):.5f}, "
                         f"top-1 class (65 random) agreement {top1.float().mean():.1%}")
    td = interleaved(det, repeats)
    base = statistics.median(td["eager"])
    lines.append(f"whole-image detect (RPN + trunk + {detect_props} regions + classify 65 + post-process):")
    for k, ts in td.items():
        lines.append(f"  {k:9s} {statistics.median(ts):8.2f} s/image  [{min(ts):.2f}-{max(ts):.2f}]  "
                     f"speed-up vs eager {base / statistics.median(ts):.2f}x")
    return lines


def agreement(env: dict[str, Any]) -> list[str]:
    """int8 vs float32 eager: top-100 detections (1000 RPN proposals, raw-logit multiplication) per demo image."""
    from regionclip.assets import demo_image_paths
    from regionclip.config import PostprocessConfig
    from regionclip.pipeline import RunOptions

    pipes, vocab = env["pipes"], env["vocab"]
    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100,
                                                    rpn_score="raw"))
    lines = ["int8 vs float32 eager, top-100 detections, 1000 RPN proposals, 65 random classes:"]
    for path in demo_image_paths():
        prep = [pipes["eager"].prepare(path)]
        regions = pipes["eager"].proposals(prep, opts)
        feats = pipes["eager"].features(prep, opts)
        de = pipes["eager"].detect_prepared(prep, vocab, opts, regions=regions, features=feats)[0]
        dq = pipes["ort-int8"].detect_prepared(prep, vocab, opts, regions=regions, features=feats)[0]
        a = list(zip(de.region_index.tolist(), de.labels.tolist()))
        b = list(zip(dq.region_index.tolist(), dq.labels.tolist()))
        in_set = sum(x in set(b) for x in a) / max(1, len(a))
        same_pos = sum(x == y for x, y in zip(a, b)) / max(1, len(a))
        gaps = de.scores[:-1] - de.scores[1:]
        lines.append(f"  {path.name}: same (class, source region) in the top-100 set {in_set:.1%}, at the same rank "
                     f"{same_pos:.1%}; eager top-100 scores {float(de.scores[-1]):.4f}..{float(de.scores[0]):.4f}, "
                     f"median gap between ranks {float(gaps.median()):.1e}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", type=int, default=1000)
    ap.add_argument("--detect-proposals", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 regions (scaled to 1000), detect with 100 proposals")
    ap.add_argument("--agreement", action="store_true", help="also measure int8 detection agreement")
    ap.add_argument("--export-dir", type=Path, default=Path.home() / ".cache" / "regionclip-tests" / "export_rn50")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_cpu.txt")
    args = ap.parse_args()
    if args.quick:
        args.regions, args.detect_proposals = 128, 100
    import onnxruntime

    from regionclip.inference.hardware import cpu_flags_line
    from regionclip.utils import atomic_path

    env = load(args.export_dir)
    head = [cpu_flags_line(), f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, onnxruntime "
            f"{onnxruntime.__version__} (intra-op threads = torch's)", f"backends: {', '.join(env['pipes'])}",
            f"load average at start: {os.getloadavg()[0]:.1f} (shared machine: numbers are noisy)"]
    print("\n".join(head), flush=True)
    lines = head + speed(env, args.regions, args.detect_proposals, args.repeats)
    print("\n".join(lines[len(head):]), flush=True)
    if args.agreement:
        extra = agreement(env)
        print("\n".join(extra), flush=True)
        lines += extra
    lines.append(f"load average at end: {os.getloadavg()[0]:.1f}")
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
