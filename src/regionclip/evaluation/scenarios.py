"""Evaluation scenarios: the original's evaluation commands by name (docs/DESIGN.md#settings).

A scenario = a model preset (:mod:`regionclip.inference.presets`: weights, RPN, post-processing, region source) + the
dataset the original evaluated it on + what the paper / model zoo reports. docs/EVALUATION.md lists the
commands.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalScenario:
    name: str
    preset: str  # regionclip.inference.presets name
    dataset: str  # regionclip.data.datasets.REGISTERED_DATASETS name
    original_config: str  # the original's config file (under configs/)
    reported: str  # the published number, or why there is none


SCENARIOS: dict[str, EvalScenario] = {s.name: s for s in [
    EvalScenario("coco-gt", "coco-gt", "coco_2017_ovd_all_test",
                 "COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml (CROP_REGION_TYPE GT)",
                 "paper Table 4 (zero-shot, GT boxes); the repo states no number"),
    EvalScenario("coco-rpn", "coco-rpn", "coco_2017_ovd_all_test",
                 "COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml + rpn_lvis_866.pth",
                 "paper Table 4 (zero-shot, RPN boxes); the repo states no number"),
    EvalScenario("lvis-gt", "lvis-gt", "lvis_v1_val",
                 "LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml (CROP_REGION_TYPE GT)",
                 "paper Table 4 (zero-shot, GT boxes); the repo states no number"),
    EvalScenario("lvis-rpn", "lvis-rpn", "lvis_v1_val",
                 "LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml + rpn_lvis_866.pth",
                 "paper Table 4 (zero-shot, RPN boxes); the repo states no number"),
    EvalScenario("coco-ovd", "coco-ovd", "coco_2017_ovd_all_test",
                 "COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml (test.sh: soft-NMS)",
                 "RN50: Novel AP50 31.4 / All AP50 50.4 (MODEL_ZOO); RN50x4: Novel AP50 39.3 (paper)"),
    EvalScenario("lvis-ovd", "lvis-ovd", "lvis_v1_val",
                 "LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4.yaml (test.sh: soft-NMS)",
                 "RN50x4: APr 22.0 / AP 32.3 (MODEL_ZOO); RN50: APr 17.1 (paper)"),
]}


def get_scenario(name: str) -> EvalScenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}") from None
