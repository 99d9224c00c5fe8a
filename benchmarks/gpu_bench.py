"""GPU throughput of the pipeline: images/s and peak memory for RN50 / RN50x4 x GT (8 boxes) / RPN-1000 x batch
1 / 8 / 32 x float32 / bfloat16, on synthetic 1333x750 images and randomly initialised models (speed does not
depend on the weights). Every region is encoded (``skip_unreachable`` off), so RPN-1000 measures the full region
head. Prints a table; asserts nothing.

    python benchmarks/gpu_bench.py [--device cuda] [--chunk 4096] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
import types

import torch

try:  # the tokenizer's text cleaner is not needed for detection with given class embeddings
    import ftfy  # noqa: F401
except ImportError:
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)  # type: ignore[assignment]

from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, PostprocessConfig, RPNConfig  # noqa: E402
from regionclip.factory import build_detector  # noqa: E402
from regionclip.modeling.fusion import fused_for_inference  # noqa: E402
from regionclip.pipeline import Pipeline, RunOptions  # noqa: E402
from regionclip.structures import PreparedImage  # noqa: E402
from regionclip.text.vocabulary import Vocabulary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--models", nargs="+", default=["rn50", "rn50x4"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    lines = [f"# {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
             f"chunk {args.chunk}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}",
             "model   mode   batch dtype      img/s   s/batch  peak_GB"]
    print("\n".join(lines), flush=True)
    g = torch.Generator().manual_seed(0)
    for name in args.models:
        clip = ClipResNetConfig.rn50() if name == "rn50" else ClipResNetConfig.rn50x4()
        det = build_detector(DetectorConfig(clip=clip, rpn=RPNConfig.fpn(nms_thresh=0.9, post_nms_topk=1000)))
        det = det.eval().to(dev)
        det = fused_for_inference(det)
        pipe = Pipeline(det, InputConfig())
        vocab = Vocabulary.create(torch.randn(1203, clip.embed_dim, generator=g)).to(dev)
        for mode in ("gt", "rpn"):
            for bs in args.batches:
                imgs = [PreparedImage(torch.randint(0, 255, (3, 750, 1333), dtype=torch.uint8, generator=g).to(dev),
                                      (1080, 1920), (750, 1333)) for _ in range(bs)]
                for dtype in args.dtypes:
                    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.02, detections_per_image=300,
                                                                    rpn_score="none"),
                                      dtype=dtype, chunk_size=args.chunk, skip_unreachable=False)
                    regions = None
                    if mode == "gt":
                        regions = [pipe.user_regions(torch.tensor([[100., 100., 600., 500.]] * 8) +
                                                     torch.arange(8.).view(8, 1) * 40, p) for p in imgs]
                        regions = [type(r)(r.boxes.to(dev), None) for r in regions]
                    try:
                        torch.cuda.reset_peak_memory_stats(dev)
                        pipe.detect_prepared(imgs, vocab, opts, regions=regions)  # warm-up
                        torch.cuda.synchronize(dev)
                        reps = 3 if bs < 32 else 2
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            pipe.detect_prepared(imgs, vocab, opts, regions=regions)
                        torch.cuda.synchronize(dev)
                        dt = (time.perf_counter() - t0) / reps
                        peak = torch.cuda.max_memory_allocated(dev) / 2**30
                        line = f"{name:7s} {mode:5s} {bs:5d} {dtype:9s} {bs / dt:7.1f} {dt:8.3f} {peak:8.2f}"
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        line = f"{name:7s} {mode:5s} {bs:5d} {dtype:9s}  out of memory"
                    print(line, flush=True)
                    lines.append(line)
        del det, pipe
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
