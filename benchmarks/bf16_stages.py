"""Where bfloat16 loses agreement with float32, stage by stage, in RPN mode (the ``lvis-rpn`` preset).

Each row runs whole-image detection on the demo images with a set of stages in bfloat16 and every other stage in
float32, and reports the share of the float32 detections that the row also reports (same class at box IoU >= 0.5,
and same class from the same source region: benchmarks/compare.py's definitions), plus the error of what the stage
feeds the classifier (region-embedding cosine to float32, max |logit| difference after the 1/0.01 temperature).

Stages: ``trunk`` (stem..layer3 -> the res4 map, rounded to bf16 on output), ``roi`` (the res4 map rounded to bf16
before RoIAlign and the pooled RoIs rounded to bf16 before layer4, with a float32 trunk and layer4: the rounding
RoIAlign sees), ``layer4`` (the region convs), ``attnpool`` (the attention pool), ``classifier`` (cosines and the
1/0.01 temperature in bf16), ``rpn`` (the offline RPN). ``mixed`` = :data:`regionclip.modeling.detector.BF16_STAGES`, the
set ``--dtype bfloat16`` runs in bfloat16.

Weights: the seed-0 random official-format checkpoints (tests/conftest.py::random_checkpoints); 65 random classes.
On a CPU without native bf16 every bf16 row is emulated (correct numbers, slow).

    python benchmarks/bf16_stages.py                      # RN50, both demo images, 1000 proposals
    python benchmarks/bf16_stages.py --max-proposals 50   # quick check that it runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

BF16 = torch.bfloat16


def _ac(on: bool) -> Any:
    return torch.autocast("cpu", dtype=BF16, enabled=on)


class StagedRecognizer:
    """The fused detector with a chosen set of stages in bfloat16 (all others float32); records the embeddings."""

    def __init__(self, inner: Any, stages: set[str]) -> None:
        self.inner, self.stages = inner, stages
        self.last_emb: Optional[Tensor] = None
        self.refined = 0
        if "trusted" in stages:  # the pipeline's own --dtype bfloat16 path: real model, float32 refinement
            self.encode_regions = self.encode_regions_counted  # type: ignore[method-assign]
            self.compute_features = self.inner.compute_features  # type: ignore[method-assign]
            self.classify = self.inner.classify  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_regions_counted(self, features: Tensor, boxes: Sequence[Tensor], **kw: Any) -> Any:
        """The real detector's encode (the trusted row), counting float32 re-encodes."""
        if not torch.is_autocast_enabled("cpu"):
            self.refined += sum(len(b) for b in boxes)
        return self.inner.encode_regions(features, boxes, **kw)

    def propose(self, images: Sequence[Tensor]) -> Any:
        if "rpn" not in self.stages:
            return self.inner.propose(images)
        with _ac(True):  # the RPN module under autocast (the pipeline never does this)
            props = self.inner.rpn([x.float() for x in images])
        return props

    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        from regionclip.modeling.detector import normalize_and_pad

        # the backbone directly: the detector's own compute_features keeps the trunk float32 (detector.BF16_STAGES)
        batch = normalize_and_pad(images, self.inner.pixel_mean, self.inner.pixel_std)
        with _ac("trunk" in self.stages):
            return self.inner.backbone.forward_res4(batch)

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int,
                       return_res5: bool = False) -> tuple[Tensor, None]:
        from torchvision.ops import roi_align

        from regionclip.modeling.detector import RES4_STRIDE, boxes_to_rois

        det, bb = self.inner, self.inner.backbone
        rnd = "roi" in self.stages
        pool_in = features.float()
        if rnd:
            pool_in = pool_in.to(BF16).float()
        rois = boxes_to_rois(boxes, pool_in)
        embs = []
        for s in range(0, rois.shape[0], chunk_size):
            pooled = roi_align(pool_in, rois[s:s + chunk_size], output_size=det.pooler_resolution,
                               spatial_scale=1.0 / RES4_STRIDE, sampling_ratio=det.sampling_ratio, aligned=True)
            if rnd:
                pooled = pooled.to(BF16).float()
            with _ac("layer4" in self.stages):
                res5 = bb.forward_res5(pooled)
            with _ac("attnpool" in self.stages):
                emb = bb.attnpool(res5 if "attnpool" in self.stages else res5.float())
            embs.append(emb.float())
        out = torch.cat(embs) if embs else features.new_zeros(0, det.embed_dim).float()
        self.last_emb = out
        return out, None

    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor:
        if "classifier" not in self.stages:
            return self.inner.classify(region_emb, class_embeddings)
        x = F.normalize(region_emb.to(BF16), dim=1)
        w = F.normalize(class_embeddings.to(BF16), dim=1)
        cls = x @ w.t()
        logits = torch.cat([cls, cls.new_zeros(len(cls), 1)], dim=1) / self.inner.temperature
        return F.softmax(logits, dim=-1).float()


def agreement(ref: Any, det: Any) -> tuple[float, float]:
    """(same class + source region, same class at IoU >= 0.5) as shares of the reference's detections."""
    from torchvision.ops import box_iou

    if len(ref.scores) == 0:
        return float("nan"), float("nan")
    b = set(zip(det.region_index.tolist(), det.labels.tolist()))
    src = sum(x in b for x in zip(ref.region_index.tolist(), ref.labels.tolist())) / len(ref.scores)
    iou = ((box_iou(ref.boxes, det.boxes) >= 0.5) & (ref.labels[:, None] == det.labels[None])).any(1)
    return src, iou.float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="rn50", choices=["rn50", "rn50x4"])
    ap.add_argument("--max-proposals", type=int, default=None)
    ap.add_argument("--shift", type=float, default=0.0, help="RPN objectness shift of the random RPN (compare.py "
                    "uses -0.95 for its mostly-negative setting)")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows (names as printed)")
    ap.add_argument("--time", action="store_true", help="instead: time float32 / trusted bf16 / bf16 scan on the "
                    "first demo image (RPN and trunk once, then the region head + classify + post-processing of "
                    "each path, interleaved --repeats times), with the regions the refinement encodes again")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.time:
        return time_paths(args)

    from conftest import random_checkpoints

    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.pipeline import Pipeline
    from regionclip.inference.hardware import cpu_flags_line
    from regionclip.modeling.detector import BF16_STAGES
    from regionclip.text.vocabulary import Vocabulary

    print(f"# {cpu_flags_line()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    ck = random_checkpoints(args.variant, 0, rpn_objectness_shift=args.shift)
    model = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], preset="lvis-rpn")
    vocab = Vocabulary.create(torch.load(ck["concept_emb"], weights_only=True).float(),
                              embed_dim=model.detector.embed_dim)
    opts = model.run_options(max_proposals=args.max_proposals)
    prepared = [model.pipeline.prepare(p) for p in demo_image_paths()]
    rows = {"float32": set(), "trunk": {"trunk"}, "roi": {"roi"}, "layer4": {"layer4"}, "attnpool": {"attnpool"},
            "classifier": {"classifier"}, "rpn": {"rpn"}, "trunk+layer4+attnpool (old bf16)":
            {"trunk", "layer4", "attnpool"}, "mixed (BF16_STAGES)": set(BF16_STAGES),
            "trusted bf16 (--dtype bfloat16)": {"trusted"}}
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows or k == "float32"}
    ref: dict[int, Any] = {}
    ref_emb: dict[int, Tensor] = {}
    print(f"{args.variant}, lvis-rpn, {len(vocab.names)} classes, max_proposals={args.max_proposals}, "
          f"RPN shift {args.shift:g}", flush=True)
    print(f"{'bf16 stages':34s} {'image':>5s} {'dets':>5s} {'src%':>6s} {'IoU%':>6s} {'cos min':>8s} "
          f"{'max|dlogit|':>11s} {'s':>6s} {'regions':>7s}", flush=True)
    totals: dict[str, list[float]] = {}
    # float32 proposals and res4 maps are computed once per image and reused by the rows that keep them float32
    cache: dict[tuple[str, bool, int], Any] = {}
    with torch.inference_mode():
        for name, stages in rows.items():
            for i, p in enumerate(prepared):
                rec = StagedRecognizer(model.detector, stages)
                pipe = Pipeline(rec, model.pipeline.input_cfg)  # type: ignore[arg-type]
                t = time.perf_counter()
                rkey, fkey = ("rpn", "rpn" in stages, i), ("trunk", "trunk" in stages, i)
                if rkey not in cache:
                    cache[rkey] = pipe.proposals([p], opts)
                if fkey not in cache:
                    cache[fkey] = rec.compute_features([p.image])
                if "trusted" in stages:  # the pipeline's own bf16 path (its own autocast, float32 trunk)
                    det = pipe.detect_prepared([p], vocab, replace(opts, dtype="bfloat16"), regions=cache[rkey],
                                               features=cache[fkey])[0]
                else:
                    det = pipe.detect_prepared([p], vocab, opts, regions=cache[rkey], features=cache[fkey])[0]
                secs = time.perf_counter() - t
                emb = rec.last_emb
                if name == "float32":
                    assert emb is not None
                    ref[i], ref_emb[i] = det, emb
                    print(f"{name:34s} {i:5d} {len(det.scores):5d} {'':6s} {'':6s} {'':8s} {'':11s} {secs:6.1f} {len(set(det.region_index.tolist())):7d}",
                          flush=True)
                    continue
                src, iou = agreement(ref[i], det)
                cos = dlogit = float("nan")
                if emb is not None and emb.shape == ref_emb[i].shape:  # same proposals (not rpn / trusted rows)
                    cos = F.cosine_similarity(emb, ref_emb[i], dim=1).min().item()
                    w = F.normalize(vocab.class_embeddings.float(), dim=1)
                    lg = (F.normalize(emb, dim=1) - F.normalize(ref_emb[i], dim=1)) @ w.t() / 0.01
                    dlogit = lg.abs().max().item()
                n = len(ref[i].scores)
                tot = totals.setdefault(name, [0.0, 0.0, 0.0])
                tot[0] += src * n
                tot[1] += iou * n
                tot[2] += n
                print(f"{name:34s} {i:5d} {len(det.scores):5d} {100 * src:6.1f} {100 * iou:6.1f} {cos:8.5f} "
                      f"{dlogit:11.3f} {secs:6.1f} {len(set(det.region_index.tolist())):7d}"
                      + (f"  ({rec.refined} of {len(ref_emb[i])} regions encoded again in float32)" if rec.refined else ""),
                      flush=True)
    print("# pooled over the images (share of all float32 detections):")
    for name, (s, u, n) in totals.items():
        print(f"{name:34s} src {100 * s / n:5.1f} %  IoU {100 * u / n:5.1f} %  of {int(n)} detections")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


def time_paths(args: argparse.Namespace) -> None:
    """Seconds of each path on demo image 0 (see --time), with the load average next to every number."""
    from conftest import random_checkpoints

    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.pipeline import Pipeline
    from regionclip.text.vocabulary import Vocabulary

    ck = random_checkpoints(args.variant, 0, rpn_objectness_shift=args.shift)
    model = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], preset="lvis-rpn")
    vocab = Vocabulary.create(torch.load(ck["concept_emb"], weights_only=True).float(),
                              embed_dim=model.detector.embed_dim)
    base = model.run_options(max_proposals=args.max_proposals)
    p = model.pipeline.prepare(demo_image_paths()[0])
    pipe = model.pipeline
    with torch.inference_mode():
        t = time.perf_counter()
        props = pipe.proposals([p], base)
        t_rpn = time.perf_counter() - t
        t = time.perf_counter()
        feats = pipe.features([p], base)
        t_trunk = time.perf_counter() - t
    print(f"# {args.variant}, RPN shift {args.shift:g}: RPN {t_rpn:.2f} s, trunk (float32 in every path) "
          f"{t_trunk:.2f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    paths = {"float32": base, "bf16 trusted": replace(base, dtype="bfloat16"),
             "bf16 scan only": replace(base, dtype="bfloat16", refine_float32=False)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    counted = StagedRecognizer(model.detector, {"trusted"})
    timed_pipe = Pipeline(counted, pipe.input_cfg)  # type: ignore[arg-type]
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, opts in paths.items():
                counted.refined = 0
                t = time.perf_counter()
                timed_pipe.detect_prepared([p], vocab, opts, regions=props, features=feats)
                dt = time.perf_counter() - t
                if rep:
                    times[name].append(dt)
                    print(f"{name:15s} head+classify+post {dt:6.2f} s  (+ RPN + trunk = {dt + t_rpn + t_trunk:6.2f} "
                          f"s/img; {counted.refined if name == 'bf16 trusted' else 0} regions encoded again in "
                          f"float32; load average "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
    for name, ts in times.items():
        print(f"# {name:15s} median head+classify+post {sorted(ts)[len(ts) // 2]:.2f} s")


if __name__ == "__main__":
    main()
