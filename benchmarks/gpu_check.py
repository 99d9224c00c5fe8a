"""One prepared device check (benchmarks/gpu_check.sh): RN50 and RN50x4, RPN-1000 (the ``lvis-rpn`` settings: RPN NMS
0.9, 1000 proposals, raw-logit multiplication, score > 0.02, 300 detections), float32 / trusted bfloat16 (float32
refinement of the decisive regions, the default of ``--dtype bfloat16``) / the plain bfloat16 scan.

Per row: images/s over whole batches (``Pipeline.detect_prepared``: RPN, trunk, region head, classify,
post-processing; decoding excluded), per-stage ms per batch (RPN, trunk, region head, classify + post-processing +
refinement), peak device memory, and the agreement of the first ``--ref-images`` images with the float32 result of
the same model on the CPU (share of the CPU detections reported with the same class at IoU >= 0.5 / from the same
source region: benchmarks/compare.py's definitions). Every region is encoded (no work skipping), so the head cost is
the full RPN-1000 one.

Weights: randomly initialised full-size models (torch seed 0; speed does not depend on the values; the device
machine has no ../shared for the official-format random checkpoints), a 1203-class vocabulary planted near the
float32 embeddings of the first image's proposals (so class probabilities are spread as with real weights, and
16-bit rounding shows in the agreement; random class vectors give p ~ 1 for one class and hide it). Images: the
two bundled demo photos, resized to 1333x750 as the original does, repeated to fill the batch.

    bash benchmarks/gpu_check.sh                             # on the device: < 5 min on one H100
    python benchmarks/gpu_check.py --device cpu --models tiny --batch 2 --proposals 40 --classes 65  # anywhere
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any, Callable

import torch

MODELS = ("rn50", "rn50x4", "tiny")


def build(name: str, device: torch.device, proposals: int) -> Any:
    """A fused random-init detector (RPN-``proposals``, NMS 0.9) and its input config."""
    from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, RPNConfig
    from regionclip.factory import build_detector
    from regionclip.modeling.fusion import fused_for_inference

    torch.manual_seed(0)
    if name == "tiny":  # tests/_region_helpers.py's tiny shapes: runs in seconds on a CPU
        clip = ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=4, image_resolution=64)
        rpn = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                            fpn_out_channels=16, post_nms_topk=proposals, nms_thresh=0.9)
        inp = InputConfig(min_size=192, max_size=320)
    else:
        clip = ClipResNetConfig.rn50() if name == "rn50" else ClipResNetConfig.rn50x4()
        rpn = RPNConfig.fpn(nms_thresh=0.9, post_nms_topk=proposals)
        inp = InputConfig()
    det = build_detector(DetectorConfig(clip=clip, rpn=rpn, input=inp)).eval()
    return fused_for_inference(det).to(device), inp


def agreement(ref: Any, det: Any) -> str:
    from torchvision.ops import box_iou

    if len(ref.scores) == 0:
        return "(no detections)"
    ref_boxes, boxes = ref.boxes.cpu(), det.boxes.cpu()
    same = ref.labels.cpu()[:, None] == det.labels.cpu()[None]
    iou = ((box_iou(ref_boxes, boxes) >= 0.5) & same).any(1).float().mean().item()
    b = set(zip(det.region_index.tolist(), det.labels.tolist()))
    src = sum(x in b for x in zip(ref.region_index.tolist(), ref.labels.tolist())) / len(ref.scores)
    return f"{100 * iou:5.1f}/{100 * src:5.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["rn50", "rn50x4"], choices=MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--proposals", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=1203)
    ap.add_argument("--reps", type=int, default=3, help="timed batches per row (after one warm-up)")
    ap.add_argument("--ref-images", type=int, default=2, help="images compared with the float32 CPU result")
    ap.add_argument("--chunk", type=int, default=None, help="regions per head call (default: the device's)")
    args = ap.parse_args()

    from regionclip.assets import demo_image_paths
    from regionclip.config import PostprocessConfig
    from regionclip.pipeline import Pipeline, RunOptions
    from regionclip.inference.hardware import cpu_flags_line
    from regionclip.text.vocabulary import Vocabulary

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"# device: {name}; torch {torch.__version__}; {cpu_flags_line()}; load average "
          f"{os.getloadavg()[0]:.1f}; batch {args.batch}, RPN-{args.proposals}, {args.classes} classes", flush=True)
    print("model   dtype          img/s   rpn_ms trunk_ms  head_ms  post_ms  peak_GB  agree IoU/src% vs CPU fp32",
          flush=True)
    post = PostprocessConfig(score_thresh=0.02, nms_thresh=0.5, detections_per_image=300, rpn_score="raw")
    rows = (("float32", "float32", True), ("bf16 trusted", "bfloat16", True), ("bf16 scan", "bfloat16", False))
    for model_name in args.models:
        t_model = time.perf_counter()
        det, inp = build(model_name, dev, args.proposals)
        pipe = Pipeline(det, inp)
        paths = demo_image_paths()
        prepared_cpu = [pipe.prepare(paths[i % len(paths)]) for i in range(args.batch)]
        prepared = [replace(p, image=p.image.to(dev)) for p in prepared_cpu]
        base = RunOptions(postprocess=post, chunk_size=args.chunk, skip_unreachable=False)
        with torch.no_grad():  # planted vocabulary: near the float32 embeddings of image 0's proposals
            props0 = pipe.proposals(prepared[:1], base)
            emb0 = pipe.encode(pipe.features(prepared[:1], base), [props0[0].boxes], base).cpu()
        g = torch.Generator().manual_seed(0)
        pick = torch.randint(0, len(emb0), (args.classes,), generator=g)
        noise = torch.randn(args.classes, emb0.shape[1], generator=g) * emb0.norm(dim=1).mean()
        vocab_cpu = Vocabulary.create(emb0[pick] + 0.05 * noise, embed_dim=emb0.shape[1])
        vocab = vocab_cpu.to(dev) if cuda else vocab_cpu
        # the float32 CPU reference of the first images
        det_cpu = det.to("cpu") if cuda else det
        ref = Pipeline(det_cpu, inp).detect_prepared(prepared_cpu[:args.ref_images], vocab_cpu, base)
        det.to(dev)
        for label, dtype, refine in rows:
            opts = replace(base, dtype=dtype, refine_float32=refine)
            try:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                out = pipe.detect_prepared(prepared, vocab, opts)  # warm-up (also the agreement run)
                sync()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    pipe.detect_prepared(prepared, vocab, opts)
                sync()
                per_batch = (time.perf_counter() - t0) / args.reps
                stages = stage_ms(pipe, prepared, vocab, opts, sync)
                peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
                agree = "  ".join(agreement(r, d) for r, d in zip(ref, out))
                print(f"{model_name:7s} {label:12s} {args.batch / per_batch:7.1f} {stages[0]:8.1f} {stages[1]:8.1f} "
                      f"{stages[2]:8.1f} {stages[3]:8.1f} {peak:8.2f}  {agree}", flush=True)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{model_name:7s} {label:12s} out of memory", flush=True)
        print(f"# {model_name}: {time.perf_counter() - t_model:.0f} s for this model (incl. the CPU reference)",
              flush=True)
        del det, pipe
        if cuda:
            torch.cuda.empty_cache()


def stage_ms(pipe: Any, prepared: list, vocab: Any, opts: Any, sync: Callable[[], None]) -> list[float]:
    """ms per batch of: RPN, trunk, region head (16-bit scan or float32), the rest of detect_prepared (classify,
    float32 refinement, post-processing) - one timed run each, synchronised around every stage."""
    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return r, 1000 * (time.perf_counter() - t)

    with torch.no_grad():
        props, t_rpn = timed(lambda: pipe.proposals(prepared, opts))
        feats, t_trunk = timed(lambda: pipe.features(prepared, opts))
        _, t_head = timed(lambda: pipe.encode(feats, [p.boxes for p in props], opts))
        _, t_all = timed(lambda: pipe.detect_prepared(prepared, vocab, opts, regions=props, features=feats))
    return [t_rpn, t_trunk, t_head, max(0.0, t_all - t_head)]


if __name__ == "__main__":
    sys.exit(main())
