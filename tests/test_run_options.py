"""Per-call settings are RunOptions fields with defaults defined once (issue 25): the Python front door, the
predictor and the CLI take their defaults from RunOptions, and each run flag lands in one RunOptions field."""
from __future__ import annotations

import argparse
from dataclasses import fields
from types import SimpleNamespace

import pytest

from regionclip.api import RegionCLIP
from regionclip.cli import common
from regionclip.config import PostprocessConfig
from regionclip.pipeline import RunOptions


def fake_model(**post):
    model = SimpleNamespace(settings=SimpleNamespace(postprocess=PostprocessConfig(**post), regions="rpn"))
    model.run_options = lambda **kw: RegionCLIP.run_options(model, **kw)  # type: ignore[arg-type]
    return model


def test_api_defaults_are_run_options_defaults() -> None:
    opts = fake_model(score_thresh=0.3).run_options()
    base = RunOptions()
    for f in fields(RunOptions):
        if f.name != "postprocess":
            assert getattr(opts, f.name) == getattr(base, f.name), f.name
    assert opts.postprocess.score_thresh == 0.3  # the model's resolved settings


def test_every_run_options_field_and_postprocess_field_is_settable_per_call() -> None:
    # refine_float32 was not reachable through RegionCLIP.run_options before (it went to the post-processing config)
    opts = fake_model().run_options(refine_float32=False, batch_size=3, chunk_size=5, score_thresh=0.5,
                                    nms_thresh=0.4)
    assert (opts.refine_float32, opts.batch_size, opts.chunk_size) == (False, 3, 5)
    assert (opts.postprocess.score_thresh, opts.postprocess.nms_thresh) == (0.5, 0.4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['chunk'\].*RunOptions fields"):
        fake_model().run_options(chunk=5)


def _run_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    common.add_run_args(p)
    return p.parse_args(argv)


def test_cli_run_flag_defaults_are_run_options_defaults() -> None:
    args = _run_args([])
    base = RunOptions()
    assert args.batch_size == base.batch_size and args.dtype == base.dtype and args.max_pixels == base.max_pixels
    assert args.chunk_size == base.chunk_size and args.max_proposals == base.max_proposals


def test_each_cli_run_flag_lands_in_one_run_options_field() -> None:
    args = _run_args(["--batch-size", "3", "--dtype", "bfloat16", "--chunk-size", "7", "--max-proposals", "11",
                      "--num-workers", "0", "--max-pixels", "0"])
    args.device = "cpu"
    opts = common.run_options(fake_model(), args)  # type: ignore[arg-type]
    assert (opts.batch_size, opts.dtype, opts.chunk_size, opts.max_proposals, opts.num_workers, opts.max_pixels) \
        == (3, "bfloat16", 7, 11, 0, None)  # --max-pixels 0 = no limit


def test_gt_model_options_record_no_rpn_score() -> None:
    """A model loaded for given boxes (regions="gt") has no objectness: its RunOptions say rpn_score="none" even when
    a call asks for "raw" (what the pipeline applies in GT mode), so fingerprints and the settings line show what
    runs; an RPN model keeps the call's choice."""
    gt = fake_model()
    gt.settings.regions = "gt"
    assert gt.run_options(rpn_score="raw", score_thresh=0.2).postprocess.rpn_score == "none"
    assert gt.run_options(rpn_score="raw", score_thresh=0.2).postprocess.score_thresh == 0.2
    assert fake_model().run_options(rpn_score="raw").postprocess.rpn_score == "raw"
