"""Names/s of the 81-template class-embedding computation: the old procedures against the current one.

Full-size text tower (RN50: width 512, 12 layers, D 1024; RN50x4: 640/640) with random weights (the cost does
not depend on the values), float32, ``torch`` default threads unless ``--threads``. Prints the CPU model, the
load average (a shared machine's numbers move with it), then for each procedure the names/s and the largest
deviation from the original procedure on the names both computed:

* ``original``: one name per forward (its 81 prompts), every prompt padded to 77 tokens - RegionCLIP's
  ``tools/extract_concept_features.py``; slow, so timed on ``--baseline-names`` names only;
* ``trimmed``: the previous implementation (3 names = 243 prompts per forward, each batch cut after its longest
  prompt's EOT), also on ``--baseline-names`` names;
* ``current``: :func:`regionclip.text.embeddings.concept_embeddings` (prompts batched across names, shared
  template prefixes computed once, packed tails) on ``--names`` names.

    python benchmarks/text_embeddings.py                       # 200 LVIS names, random RN50 checkpoint
    python benchmarks/text_embeddings.py --names 50 --random-init --batch-size 256 512 1024
    python benchmarks/text_embeddings.py --names 100 --skip-baselines --dtypes float32 bfloat16
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def original_procedure(encoder, names: list[str], templates: list[str]) -> Tensor:
    """RegionCLIP's extraction: per name, its T prompts as one [T, 77] batch, mean of the pooled features."""
    from regionclip.text.prompts import build_prompts
    from regionclip.text.tokenizer import default_tokenizer

    tok = default_tokenizer()
    with torch.inference_mode():
        return torch.stack([encoder.encode_text(tok(build_prompts(n, templates))).mean(0) for n in names])


def trimmed_procedure(encoder, names: list[str], templates: list[str], batch_size: int = 256) -> Tensor:
    """The previous implementation: batch_size // T names per step, each batch cut after its longest EOT."""
    from regionclip.text.embeddings import encode_tokens
    from regionclip.text.prompts import build_prompts
    from regionclip.text.tokenizer import default_tokenizer

    tok = default_tokenizer()
    per = max(1, batch_size // len(templates))
    rows = []
    for s in range(0, len(names), per):
        chunk = names[s:s + per]
        feats = encode_tokens(encoder, tok([p for n in chunk for p in build_prompts(n, templates)]), batch_size)
        rows.append(feats.view(len(chunk), len(templates), -1).mean(1))
    return torch.cat(rows)


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="rn50", choices=["rn50", "rn50x4"])
    ap.add_argument("--names", type=int, default=200, help="LVIS names for the current procedure (default 200)")
    ap.add_argument("--baseline-names", type=int, default=6,
                    help="names for the two old procedures (slow; default 6)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None,
                    help="prompts per forward for the current procedure, one run each (default: its default)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--random-init", action="store_true",
                    help="a randomly initialised tower instead of the random official-format checkpoint "
                         "(needs no ../shared)")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="compute dtypes of the current procedure (bfloat16 rows also print the cosine to the "
                         "float32 row; on a CPU without native bf16 it is emulated and slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from regionclip.assets import vocabulary
    from regionclip.config import ClipTextConfig
    from regionclip.modeling.text_encoder import build_text_encoder
    from regionclip.factory import load_text_tower
    from regionclip.text.embeddings import DEFAULT_BATCH_SIZE, concept_embeddings
    from regionclip.text.prompts import default_templates

    if args.random_init:
        torch.manual_seed(0)
        encoder = build_text_encoder(getattr(ClipTextConfig, args.variant)()).eval()
    else:
        from conftest import random_checkpoints

        encoder = load_text_tower(random_checkpoints(args.variant, 0)["regionclip"])
    lvis = vocabulary("lvis1203")
    step = max(1, len(lvis) // max(args.names, 1))
    names = lvis[::step][:args.names]  # spread over the alphabet: varied lengths
    templates = default_templates()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"CPU: {cpu_model()} | torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (cores: {os.cpu_count()})")
    print(f"text tower {args.variant}: width {encoder.width}, {len(encoder.transformer.resblocks)} layers, "
          f"D {encoder.embed_dim}, float32, {len(templates)} templates")

    base = names[:args.baseline_names]
    ref = None
    if not args.skip_baselines and base:
        ref, dt = timed(lambda: original_procedure(encoder, base, templates))
        print(f"original (1 name/forward, 77 tokens): {len(base) / dt:7.3f} names/s  ({len(base)} names, {dt:.1f} s)")
        old, dt = timed(lambda: trimmed_procedure(encoder, base, templates))
        print(f"trimmed  (3 names/forward, cut at EOT): {len(base) / dt:7.3f} names/s  ({len(base)} names, "
              f"{dt:.1f} s)  max|diff| vs original {(old - ref).abs().max().item():.2e}")
    f32: dict[int, Tensor] = {}
    for dtype in args.dtypes:
        for bs in args.batch_size or [DEFAULT_BATCH_SIZE]:
            emb, dt = timed(lambda bs=bs, dtype=dtype: concept_embeddings(names, encoder, batch_size=bs, dtype=dtype))
            msg = f"current  {dtype:8s} (batch {bs} prompts, shared prefixes): {len(names) / dt:7.3f} names/s  " \
                  f"({len(names)} names, {dt:.1f} s, load {os.getloadavg()[0]:.1f})"
            if ref is not None:
                diff = (emb[:len(base)] - ref).abs().max().item()
                msg += f"  max|diff| vs original {diff:.2e} (max|value| {ref.abs().max().item():.2f})"
            if dtype == "float32":
                f32[bs] = emb
            elif bs in f32:
                cos = torch.nn.functional.cosine_similarity(emb, f32[bs], dim=1)
                unit = torch.nn.functional.normalize
                same = (unit(f32[bs], dim=1) @ unit(emb, dim=1).t()).argmax(1) == torch.arange(len(names))
                msg += f"  cosine to float32 min {cos.min().item():.6f}, each name's nearest class itself: " \
                       f"{int(same.sum())}/{len(names)}"
            print(msg, flush=True)


if __name__ == "__main__":
    main()
