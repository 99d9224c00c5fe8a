"""Measure the float-rounding noise of every parity quantity (not a test: pytest does not collect this file).

Runs the same library calls as the parity tests (their ``*_outputs`` functions) and prints, per quantity and
image, the max absolute and scale-relative difference (``_compare.diff_stats``) to the original's stored outputs,
plus the near-tie margins that decide whether rounding can reorder proposals or detections. Run it once per
kernel setting (the variables must be set before torch starts), one run at a time (2 shared cores, ~3-6 min)::

    .venv/bin/python tests/parity/_measure_noise.py --save /tmp/noise_native.pt
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python tests/parity/_measure_noise.py
    ATEN_CPU_CAPABILITY=default .venv/bin/python tests/parity/_measure_noise.py --against /tmp/noise_native.pt

``--against FILE`` compares with an earlier run saved with ``--save`` instead of with the references (noise
between two of our own kernel settings). The results are tabulated in docs/PARITY_NOISE.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _compare, the test modules, and tests/conftest.py

from _compare import LOGIT_TIE, diff_stats, match_proposals  # noqa: E402
from conftest import SHARED, random_checkpoints  # noqa: E402
from test_gt_parity import GT_POSTPROCESS, build_gt_detector, gt_outputs  # noqa: E402
from test_rpn_mode_parity import RPN_POSTPROCESS, build_rpn_detector, rpn_mode_outputs  # noqa: E402

NAMES = ["sample_img1.jpg", "sample_img2.jpg"]


def compute_all() -> dict:
    """Our outputs for both modes and images, reduced to the references' keys (res4: first 16 ch + means)."""
    from regionclip.assets import demo_image_paths
    from regionclip.data.images import load_image, resize_image

    refs = SHARED / "parity" / "refs"
    inputs = torch.load(refs / "inputs.pt", weights_only=True)
    ckpts = random_checkpoints("rn50", 0)
    out: dict = {"resized": {}, "gt": {}, "rpn": {}, "rpn_batched": {}, "postprocess_all": {}}
    paths = {p.name: p for p in demo_image_paths()}
    for name in NAMES:  # decode + PIL resize, as the original's test-time mapper (ours is prepare())
        out["resized"][name] = resize_image(load_image(paths[name]), 800, 1333)
    det = build_gt_detector(ckpts)
    for name in NAMES:
        o = gt_outputs(det, inputs[name], (750, 1333))
        res4 = o.pop("res4")
        o["res4_first16ch"], o["res4_channel_mean"] = res4[0, :16].clone(), res4[0].mean((1, 2))
        out["gt"][name] = o
    del det
    det = build_rpn_detector(ckpts)
    for name in NAMES:
        o = rpn_mode_outputs(det, inputs[name], (750, 1333))
        o["region_emb_raw_l2norm_all"] = o["region_emb_raw"].norm(dim=1)
        out["rpn"][name] = o
        # every candidate after threshold + NMS, not cut at 100: the margin at the top-100 cut
        from dataclasses import replace

        from regionclip.inference.postprocess import combine_rpn_scores, postprocess_detections
        scores = combine_rpn_scores(o["cls_probs"], o["proposal_objectness_logits"], "raw")
        allc = postprocess_detections(o["proposal_boxes"], scores, (750, 1333),
                                      replace(RPN_POSTPROCESS, detections_per_image=-1))
        out["postprocess_all"][name] = {"scores": allc["scores"], "labels": allc["labels"],
                                        "all_scores": scores[:, :-1].flatten()}
    with torch.no_grad():  # one padded batch of both images through the RPN vs one image at a time
        both = det.propose([inputs[n]["image_uint8_rgb_chw"] for n in NAMES])
    for name, b in zip(NAMES, both):
        out["rpn_batched"][name] = {"boxes": b.boxes, "logits": b.objectness_logits}
    return out


def load_refs(against: str | None) -> dict:
    """The original's outputs (or a saved run of ours) in the same layout as :func:`compute_all`."""
    if against:
        return torch.load(against, weights_only=True)
    refs = SHARED / "parity" / "refs"
    inputs = torch.load(refs / "inputs.pt", weights_only=True)
    return {"resized": {n: inputs[n]["image_uint8_rgb_chw"] for n in NAMES},
            "gt": torch.load(refs / "rn50_gt.pt", weights_only=True)["images"],
            "rpn": torch.load(refs / "rn50_rpn.pt", weights_only=True)["images"]}


def fmt(d: tuple[float, float]) -> str:
    return f"{d[0]:.2g} / {d[1]:.2g}"


def table(ours: dict, ref: dict) -> list[str]:
    """Markdown rows: quantity | img1 abs / rel | img2 abs / rel."""
    rows: dict[str, list[str]] = {}

    def add(key: str, cell: str) -> None:
        rows.setdefault(key, []).append(cell)

    for name in NAMES:
        a, e = ours["resized"][name].int(), ref["resized"][name].int()
        add("resized input (uint8 levels; differing pixels)", f"{int((a - e).abs().max())}; {int((a != e).sum())}")
        o, r = ours["gt"][name], ref["gt"][name]
        for k in ("res4_first16ch", "res4_channel_mean", "region_emb_raw", "region_emb_norm", "cls_probs"):
            add(f"GT {k}", fmt(diff_stats(o[k], r[k])))
        same = torch.equal(o["final_classes"], r["final_classes"]) and torch.equal(o["det_region_index"],
                                                                                     r["det_region_index"])
        add("GT final classes + order + region", "exact" if same else "DIFFERENT")
        add("GT final_scores", fmt(diff_stats(o["final_scores"], r["final_scores"])))
        add("GT final_boxes (px)", fmt(diff_stats(o["final_boxes"], r["final_boxes"])))
        o, r = ours["rpn"][name], ref["rpn"][name]
        ob, ol, rb, rl = (o["proposal_boxes"], o["proposal_objectness_logits"], r["proposal_boxes"],
                          r["proposal_objectness_logits"])
        add("RPN proposal boxes, row by row (px)", fmt(diff_stats(ob, rb)))
        add("RPN objectness logits, row by row", fmt(diff_stats(ol, rl)))
        perm = match_proposals(ob, ol, rb, rl, box_atol=1.0, tie=LOGIT_TIE)
        moved = int((perm != torch.arange(len(perm))).sum())
        add("RPN proposals that changed rows (near-tied logits)", str(moved))
        add("RPN proposal boxes, paired (px)", fmt(diff_stats(ob[perm], rb)))
        add("RPN objectness logits, paired", fmt(diff_stats(ol[perm], rl)))
        emb = o["region_emb_raw"][perm]
        add("RPN region_emb_raw[:50] (paired)", fmt(diff_stats(emb[:50], r["region_emb_raw"][:50])))
        add("RPN region_emb_raw L2 norms (paired)", fmt(diff_stats(emb.norm(dim=1), r["region_emb_raw_l2norm_all"])))
        add("RPN cls_probs (paired)", fmt(diff_stats(o["cls_probs"][perm], r["cls_probs"])))
        same = torch.equal(o["final_classes"], r["final_classes"]) and torch.equal(o["det_region_index"],
                                                                                     perm[r["det_region_index"]])
        add("RPN final classes + order + region", "exact" if same else "DIFFERENT")
        add("RPN final_scores", fmt(diff_stats(o["final_scores"], r["final_scores"])))
        add("RPN final_boxes (px)", fmt(diff_stats(o["final_boxes"], r["final_boxes"])))
        if "rpn_batched" in ours:
            b = ours["rpn_batched"][name]
            same = torch.equal(b["boxes"], ob) and torch.equal(b["logits"], ol)
            add("RPN batch of 2 vs 1 image (ours)", "bit-equal" if same else fmt(diff_stats(b["boxes"], ob)))
    return [f"| {k} | {' | '.join(v)} |" for k, v in rows.items()]


def margins(ours: dict, ref: dict) -> list[str]:
    """Near-tie margins of the references: can rounding reorder or reselect anything?"""
    lines = []
    for mode in ("gt", "rpn"):
        for name in NAMES:
            s = ref[mode][name]["final_scores"].double()
            gap = s[:-1] - s[1:]
            lines.append(f"{mode} {name}: min gap between consecutive final scores {float(gap.min()):.3g} "
                         f"(at rank {int(gap.argmin())}), gaps < 1e-5: {int((gap < 1e-5).sum())}, "
                         f"last score {float(s[-1]):.4g}")
    for name in NAMES:
        lg = ref["rpn"][name]["proposal_objectness_logits"].double()
        gap = lg[:-1] - lg[1:]
        lines.append(f"rpn {name}: consecutive proposal logit gaps < {LOGIT_TIE:g}: {int((gap < LOGIT_TIE).sum())}"
                     f", < 1e-6: {int((gap < 1e-6).sum())}, min {float(gap.min()):.3g}")
        if "postprocess_all" in ours:
            p = ours["postprocess_all"][name]
            s = p["scores"].double()
            if s.numel() > 100:
                lines.append(f"rpn {name}: 100th vs 101st candidate score gap (top-100 cut) "
                             f"{float(s[99] - s[100]):.3g}")
            a = p["all_scores"].double()
            a = a[torch.isfinite(a)]
            lines.append(f"rpn {name}: min |score - 0.001| over all region x class scores "
                         f"{float((a - GT_POSTPROCESS.score_thresh).abs().min()):.3g}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", help="write our outputs here (torch file) for a later --against")
    ap.add_argument("--against", help="compare with a run saved with --save instead of with the references")
    args = ap.parse_args()
    env = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    print(f"kernels: torch CPU capability {torch.backends.cpu.get_cpu_capability()}, env {env}, "
          f"threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    ours = compute_all()
    print(f"computed in {time.perf_counter() - t0:.0f} s")
    if args.save:
        torch.save(ours, args.save)
    ref = load_refs(args.against)
    print("| quantity | sample_img1 abs / rel | sample_img2 abs / rel |\n|---|---|---|")
    print("\n".join(table(ours, ref)))
    print("\n".join(margins(ours, ref if not args.against else load_refs(None))))


if __name__ == "__main__":
    main()
