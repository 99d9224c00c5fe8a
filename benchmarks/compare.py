"""Speed and agreement of the CLIP region head's execution paths: float32 eager (unfused), float32 fused
(:meth:`~regionclip.modeling.clip_resnet.ModifiedResNet.fuse_for_inference`) and bfloat16 autocast (fused).

For RN50 and RN50x4 (random official-format checkpoints, tests/conftest.py::random_checkpoints; speed does not
depend on the weight values) x {GT mode: 8 boxes, RPN mode: 1000 regions} it prints seconds per image of the
trunk (stem..layer3 = res4, once per image) and of the region head (RoIAlign -> layer4 -> attnpool, in chunks,
as RegionCLIPDetector.encode_regions), the fraction of this machine's measured float32 GEMM peak the head
achieves (nominal FLOPs of the unfused head per region x regions / time / peak: a rewrite that removes work
shows up as a fraction above what the kernels actually run at), and agreement with float32 eager (max abs
embedding difference relative to the largest embedding entry, top-1 agreement over the checkpoint's 65 random
concept embeddings). bf16 runs only where native (:func:`regionclip.runtime.native_bf16`) unless --force-bf16.

    python benchmarks/compare.py                 # full: RN50 + RN50x4, 1000 RPN regions (minutes on 2 cores)
    python benchmarks/compare.py --quick         # < 2 min: RN50, 96 regions scaled to 1000, 1 repeat
    python benchmarks/compare.py --chunk-sweep 32 64 128 256 512 1024   # fused RN50 head throughput vs chunk
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RES4_STRIDE = 16
IMAGE_HW = (800, 1216)  # a typical test-time size (shortest edge 800), multiple of 32


def load_backbone(variant: str) -> tuple[Any, torch.Tensor]:
    """(unfused eval ModifiedResNet with the random checkpoint's weights, [65, D] concept embeddings)."""
    from conftest import random_checkpoints  # generates the random files once per machine

    from regionclip.checkpoint.io import load_state_dict
    from regionclip.checkpoint.regionclip import infer_clip_resnet_config
    from regionclip.modeling.clip_resnet import ModifiedResNet

    paths = random_checkpoints(variant, 0)
    sd = load_state_dict(paths["regionclip"])
    cfg = infer_clip_resnet_config(sd)
    model = ModifiedResNet(cfg.layers, cfg.embed_dim, cfg.heads, cfg.image_resolution, cfg.width)
    model.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    emb = torch.load(paths["concept_emb"], weights_only=True)
    return model.eval(), emb.float()


def region_head(model: Any, res4: torch.Tensor, rois: torch.Tensor, pooler: int, chunk: int) -> torch.Tensor:
    """RoIAlignV2 on res4 -> layer4 -> attnpool in chunks: [R, 5] rois -> [R, D] (as the detector does)."""
    from torchvision.ops import roi_align

    out = []
    for s in range(0, rois.shape[0], chunk):
        pooled = roi_align(res4, rois[s:s + chunk], output_size=pooler, spatial_scale=1.0 / RES4_STRIDE,
                           sampling_ratio=0, aligned=True)
        out.append(model.attnpool(model.layer4(pooled)))
    return torch.cat(out)


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(min seconds over ``repeats`` runs, last result): the minimum is the least disturbed by other load."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def nominal_head_gflop(model: Any, pooler: int) -> float:
    """FLOPs of the unfused head for one region (conv/matmul/attention, as torch's FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.layer4[0].conv1.in_channels, pooler, pooler)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.attnpool(model.layer4(x))
    return fc.get_total_flops() / 1e9


def random_rois(n: int, seed: int) -> torch.Tensor:
    from _region_helpers import random_boxes

    b = random_boxes(n, *IMAGE_HW, seed=seed)
    return torch.cat([torch.zeros(n, 1), b], dim=1)


def top1(emb: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    return (F.normalize(emb.float(), dim=-1) @ F.normalize(concepts, dim=-1).T).argmax(dim=-1)


def run_variant(variant: str, modes: dict[str, int], *, scale_to: dict[str, int], repeats: int, chunk: int,
                bf16: str, peak: float) -> list[str]:
    """Rows of the table for one variant. ``bf16``: "run" | "emulated: skipped" | "native"."""
    from regionclip.modeling.clip_resnet import fused_copy

    t0 = time.perf_counter()
    eager, concepts = load_backbone(variant)
    fused = fused_copy(eager)
    pooler = 2 * eager.attnpool.spacial_dim
    gflop = nominal_head_gflop(eager, pooler)
    print(f"[{variant}] loaded in {time.perf_counter() - t0:.1f}s; nominal head {gflop:.2f} GFLOP/region",
          file=sys.stderr, flush=True)
    image = torch.randn(1, 3, *IMAGE_HW)
    configs: list[tuple[str, Any, Optional[torch.dtype]]] = [("fp32 eager", eager, None), ("fp32 fused", fused, None)]
    if bf16 in ("run", "native"):
        configs.append(("bf16 autocast", fused, torch.bfloat16))
    rows = []
    with torch.inference_mode():
        for mode, n_regions in modes.items():
            rois = random_rois(n_regions, seed=1)
            ref = None
            for name, model, dtype in configs:
                with (torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)):
                    # end to end: each config's head runs on its own trunk's res4 (what a user gets)
                    t_trunk, res4 = best_time(lambda: model.forward_res4(image), repeats)
                    t_head, emb = best_time(lambda: region_head(model, res4, rois, pooler, chunk), repeats)
                emb = emb.float()
                if ref is None:
                    ref = emb
                scale = scale_to[mode] / n_regions
                head_s = t_head * scale
                frac = gflop * scale_to[mode] / head_s / peak
                diff = ((emb - ref).abs().max() / ref.abs().max()).item()
                agree = (top1(emb, concepts) == top1(ref, concepts)).float().mean().item()
                rows.append(f"{variant:7s} {mode:4s} {scale_to[mode]:5d} {name:14s} {t_trunk:8.3f} {head_s:9.3f} "
                            f"{t_trunk + head_s:8.3f} {100 * frac:6.1f}% {diff:9.1e} {100 * agree:6.1f}%")
                print(rows[-1], flush=True)
            if bf16 == "emulated: skipped":
                rows.append(f"{variant:7s} {mode:4s} {scale_to[mode]:5d} {'bf16 autocast':14s} emulated: skipped "
                            "(no native bf16 on this CPU; --force-bf16 to run it)")
                print(rows[-1], flush=True)
    return rows


def chunk_sweep(chunks: list[int], repeats: int) -> list[str]:
    """Fused RN50 head (layer4 + attnpool, float32) regions/s as a function of the chunk size."""
    from regionclip.modeling.clip_resnet import fused_copy

    eager, _ = load_backbone("rn50")
    fused = fused_copy(eager)
    del eager
    rows = ["chunk  regions  regions/s  s/1000 regions"]
    with torch.inference_mode():
        for c in chunks:
            x = torch.randn(c, fused.layer4[0].conv1.in_channels, 14, 14)
            n_chunks = max(1, 256 // c)

            def run() -> None:
                for _ in range(n_chunks):
                    fused.attnpool(fused.layer4(x))

            run() if c <= 256 else None  # warm-up (skipped for the big ones: they are slow and warm up in run 1)
            t, _ = best_time(run, repeats)
            rate = c * n_chunks / t
            rows.append(f"{c:5d} {c * n_chunks:8d} {rate:10.2f} {1000 / rate:14.2f}")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="RN50 only, 96 RPN regions scaled to 1000, 1 repeat")
    ap.add_argument("--variants", nargs="+", default=None, choices=["rn50", "rn50x4"])
    ap.add_argument("--rpn-regions", type=int, default=None, help="regions actually run in RPN mode "
                    "(times are scaled to 1000 regions per image); default 1000, --quick 96")
    ap.add_argument("--gt-boxes", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256, help="region chunk size (the detector's default)")
    ap.add_argument("--repeats", type=int, default=None, help="best of N runs (default 2, --quick 1)")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 autocast even where it is emulated")
    ap.add_argument("--chunk-sweep", type=int, nargs="*", default=None, metavar="C",
                    help="only measure fused RN50 head throughput for these chunk sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file (atomically)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from regionclip.runtime import cpu_capabilities, cpu_flags_line, gemm_peak_gflops, native_bf16

    caps = cpu_capabilities()
    repeats = args.repeats or (1 if args.quick else 2)
    peak = gemm_peak_gflops(torch.float32)
    lines = [f"# regionclip benchmarks/compare.py ({'quick' if args.quick else 'full'}), torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}",
             "# command: python benchmarks/compare.py " + " ".join(sys.argv[1:]),
             "# " + cpu_flags_line(caps),
             f"# float32 GEMM peak measured: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)"]
    for ln in lines:
        print(ln, flush=True)
    if args.chunk_sweep is not None:
        rows = chunk_sweep(args.chunk_sweep or [32, 64, 128, 256, 512, 1024], repeats)
    else:
        variants = args.variants or (["rn50"] if args.quick else ["rn50", "rn50x4"])
        rpn_n = args.rpn_regions or (96 if args.quick else 1000)
        modes = {"gt": args.gt_boxes, "rpn": rpn_n}
        scale_to = {"gt": args.gt_boxes, "rpn": 1000}
        bf16 = "native" if native_bf16("cpu") else ("run" if args.force_bf16 else "emulated: skipped")
        header = ("variant mode  regs config         trunk_s   head_s  total_s  %peak  maxdiff   top1")
        note = (f"# s per image ({IMAGE_HW[0]}x{IMAGE_HW[1]} input); head = RoIAlign+layer4+attnpool, chunk "
                f"{args.chunk}" + (f"; rpn head measured on {rpn_n} regions and scaled to 1000" if rpn_n != 1000
                                    else "") + f"; best of {repeats}")
        print(note + "\n" + header, flush=True)
        rows = [note, header]
        for v in variants:
            rows += run_variant(v, modes, scale_to=scale_to, repeats=repeats, chunk=args.chunk, bf16=bf16, peak=peak)
    if args.out:
        from regionclip.utils import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text("\n".join(lines + rows) + "\n")


if __name__ == "__main__":
    main()
