"""Which int8 quantisation of the region head agrees best with float32 eager: the measurements behind
``regionclip.export.quantize``'s defaults (docs/EXPORT.md#int8).

RN50 random official-format weights + R50-FPN RPN (1000 proposals, NMS 0.9, raw-logit multiplication,
score > 0.001, top-100), sample_img1, calibration on RPN proposals of both demo images. For each variant: embedding
cosine to float32 on 256 proposals, and top-100 agreement (same class + source proposal / same class at box IoU
>= 0.5) with two vocabularies: the checkpoint's 65 random class embeddings, and "planted" classes (the float32
embeddings of 65 random proposals: confident scores with trained-like margins). Prints a table; asserts nothing.

    python benchmarks/int8_variants.py      # ~6 min on 2 idle cores
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def agreement(a: Any, b: Any) -> str:
    ref = list(zip(a.region_index.tolist(), a.labels.tolist()))
    other = set(zip(b.region_index.tolist(), b.labels.tolist()))
    src = sum(x in other for x in ref) / max(1, len(ref))
    iou = ((box_iou(a.boxes, b.boxes) >= 0.5) & (a.labels[:, None] == b.labels[None])).any(1).float().mean().item()
    return f"{100 * src:5.1f}/{100 * iou:5.1f}"


def main() -> None:
    from conftest import random_checkpoints
    from onnxruntime import quantization as quant

    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.cli.export import calibration_data
    from regionclip.config import PostprocessConfig
    from regionclip.export import export_model, make_backend
    from regionclip.export.quantize import _CalibrationReader
    from regionclip.pipeline import Pipeline, RunOptions
    from regionclip.inference.hardware import cpu_flags_line
    from regionclip.text.vocabulary import Vocabulary

    ck = random_checkpoints("rn50", 0)
    model = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], regions="rpn",
                                       rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 1000})
    dim = model.detector.embed_dim
    calib = calibration_data(model, demo_image_paths())
    vocab = Vocabulary.create(torch.load(ck["concept_emb"], weights_only=True).float(), embed_dim=dim)
    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100,
                                                    rpn_score="raw"), skip_unreachable=False)
    eager = model.pipeline
    prep = [eager.prepare(demo_image_paths()[0])]
    regions, feats = eager.proposals(prep, opts), eager.features(prep, opts)
    all_emb = eager.encode(feats, [regions[0].boxes], opts)
    pick = torch.randperm(len(all_emb), generator=torch.Generator().manual_seed(1))[:65]
    planted = Vocabulary.create(all_emb[pick], embed_dim=dim)
    ref = {name: eager.detect_prepared(prep, v, opts, regions=regions, features=feats)[0]
           for name, v in (("random", vocab), ("planted", planted))}
    print(f"# {cpu_flags_line()}; RN50 random weights, 1000 proposals, top-100", flush=True)
    print("variant                          cos min  cos mean  random vocab src/IoU%  planted vocab src/IoU%  "
          "s/img int8 (eager)", flush=True)
    m = quant.CalibrationMethod
    variants = {"all op types, MinMax": (None, m.MinMax, {}), "convs, MinMax": (["Conv"], m.MinMax, {}),
                "convs, entropy": (["Conv"], m.Entropy, {}),
                "convs, percentile 99.999": (["Conv"], m.Percentile, {"CalibPercentile": 99.999})}
    with tempfile.TemporaryDirectory(prefix="regionclip-int8-") as tmp:
        out = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            export_model(model.detector, out, fmt="onnx", int8=True, calibration=calib, weights_path=ck["regionclip"])
        t = time.perf_counter()
        eager.detect_prepared(prep, vocab, opts, regions=regions, features=feats)
        t_eager = time.perf_counter() - t
        for name, (ops, method, extra) in variants.items():
            with contextlib.redirect_stdout(sys.stderr):  # the calibrators print their progress
                quant.quantize_static(str(out / "region_head.onnx"), str(out / "region_head.int8.onnx"),
                                      _CalibrationReader(calib), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                                      activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                                      calibrate_method=method, op_types_to_quantize=ops, extra_options=extra)
            pipe = Pipeline(make_backend(model, "onnxruntime", out, int8=True, verify=False), model.pipeline.input_cfg)
            cos = torch.nn.functional.cosine_similarity(pipe.encode(feats, [regions[0].boxes[:256]], opts),
                                                        all_emb[:256])
            t = time.perf_counter()
            got = {"random": pipe.detect_prepared(prep, vocab, opts, regions=regions, features=feats)[0]}
            t_q = time.perf_counter() - t
            got["planted"] = pipe.detect_prepared(prep, planted, opts, regions=regions, features=feats)[0]
            print(f"{name:32s} {float(cos.min()):7.4f}  {float(cos.mean()):7.4f}  {agreement(ref['random'], got['random']):>20s}"
                  f"  {agreement(ref['planted'], got['planted']):>21s}  {t_q:6.1f} ({t_eager:.1f})", flush=True)


if __name__ == "__main__":
    main()
