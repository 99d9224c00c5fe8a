"""End-to-end transfer-learning runs on a tiny detector and a synthetic dataset of coloured rectangles (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from regionclip.config import from_dict
from regionclip.engine.train import TrainingInterrupted
from regionclip.engine.transfer import TransferConfig, load_config, run_transfer
from test_train_support import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["iteration"]: m["total_loss"] for m in _metrics(run_dir) if "total_loss" in m}


@pytest.mark.slow  # ~15 s on 2 idle cores, minutes on a loaded machine
def test_overfit_tiny_dataset_loss_down_ap_up(tmp_path: Path) -> None:
    r = tiny_recipe(tmp_path, max_iter=100)
    r["solver"].update(ims_per_batch=4, base_lr=0.002, warmup_iters=20, steps=[80])
    r["train"].update(eval_at_start=True, eval_at_end=True)
    r["data"]["eval_regions"] = "gt"  # classification of the training boxes: the tiny random RPN localises poorly
    run_transfer(from_dict(TransferConfig, r))
    run = Path(r["train"]["output_dir"])
    losses = list(_losses(run).values())
    evals = [m["eval"] for m in _metrics(run) if "eval" in m]
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"\nloss (mean of 10 iterations): first {first:.3f} -> last {last:.3f}; "
          f"AP on the training images {evals[0]['AP']:.1f} -> {evals[-1]['AP']:.1f} "
          f"(AP50 {evals[0]['AP50']:.1f} -> {evals[-1]['AP50']:.1f})")
    assert len(evals) == 2
    assert last < 0.5 * first
    assert evals[-1]["AP"] > evals[0]["AP"] + 20


def test_resume_after_crash_reproduces_the_loss_curve(tmp_path: Path) -> None:
    """Crash at iteration 6 (checkpoint at 4), resume: iterations 5..8 equal the uninterrupted run's."""
    def recipe(sub: str) -> dict:
        r = tiny_recipe(tmp_path, max_iter=8, mask=True)
        r["train"].update(output_dir=str(tmp_path / sub), checkpoint_period=4)
        return r

    run_transfer(from_dict(TransferConfig, recipe("straight")))

    def crash(iteration: int, losses: dict) -> None:
        if iteration == 6:
            raise TrainingInterrupted("simulated crash")

    cfg = from_dict(TransferConfig, recipe("crashed"))
    with pytest.raises(TrainingInterrupted):
        run_transfer(cfg, hooks=[crash])
    assert json.loads((tmp_path / "crashed" / "last_checkpoint").read_text())["iteration"] == 4
    assert max(_losses(tmp_path / "crashed")) == 6
    run_transfer(cfg, resume=True)

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "crashed")
    print("\nuninterrupted:", [round(a[i], 5) for i in sorted(a)], "\nresumed:      ",
          [round(b[i], 5) for i in sorted(b)])
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for i in range(1, 9):
        assert b[i] == pytest.approx(a[i], rel=1e-6, abs=1e-7), i
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(_metrics(tmp_path / "crashed")[-1])


def test_trained_checkpoint_runs_in_detect_and_evaluate(tmp_path: Path) -> None:
    from regionclip.api import RegionCLIP
    from regionclip.cli.main import main
    from regionclip.factory import load_detector

    r = tiny_recipe(tmp_path, max_iter=4, mask=True)
    run_transfer(from_dict(TransferConfig, r))
    run = Path(r["train"]["output_dir"])
    last = json.loads((run / "last_checkpoint").read_text())
    weights = run / last["model"]
    det, loaded = load_detector(weights)  # strict: every key has its place
    assert loaded.report.ok and det.bbox_pred is not None and det.mask_head is not None and det.rpn is not None
    assert loaded.split.test_class_embeddings is not None

    emb = Path(r["data"]["classes"]["test_embeddings"])
    model = RegionCLIP.from_pretrained(weights)
    model.set_vocabulary(["red box", "green box", "blue box"], emb)
    image = next(Path(r["data"]["train"]["image_root"]).glob("*.png"))
    dets = model.detect([str(image)], score_thresh=0.0, apply_box_deltas=True)[0]
    assert len(dets) > 0 and dets.masks is not None

    out = tmp_path / "eval"
    rc = main(["evaluate", "--weights", str(weights), "--dataset", r["data"]["test"]["json"], "--image-root",
               r["data"]["test"]["image_root"], "--concept-emb", str(emb), "--regions", "rpn", "--apply-box-deltas",
               "--no-progress", "-o", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AP" in json.dumps(metrics)


def test_config_is_strict_and_overridable(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    cfg = load_config(path, ["solver.base_lr=0.5", "roi.focal_gamma=null", "data.min_sizes=[32, 48]"])
    assert cfg.solver.base_lr == 0.5 and cfg.roi.focal_gamma is None and cfg.data.min_sizes == (32, 48)
    with pytest.raises(ValueError, match="pooler_sise"):
        load_config(path, ["roi.pooler_sise=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["solver.base_lr"])


# transfer-learning recipes only; pretrain_*.yaml and rpn_*.yaml (RPN training) recipes have their own schemas
@pytest.mark.parametrize("recipe", sorted(p for p in (REPO / "configs").glob("*.yaml")
                                          if not p.name.startswith(("pretrain", "rpn_"))),
                         ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.solver.ims_per_batch == 16 and cfg.solver.base_lr == 0.002 and cfg.solver.warmup_iters == 5000
    assert cfg.roi.batch_size_per_image == 512 and cfg.roi.positive_fraction == 0.25
    if "lvis" in recipe.name:
        assert cfg.model.mask_head and cfg.data.sampler == "repeat_factor" and cfg.roi.bg_weight == 0.8
        assert cfg.roi.focal_gamma is None and cfg.solver.max_iter == 180000
    if "coco" in recipe.name:
        assert cfg.roi.focal_gamma == 0.5 and cfg.roi.bg_weight == 0.2 and cfg.solver.max_iter == 90000
