"""Two-process CPU training through ``torchrun`` (gloo): the same command as on GPUs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train_support import tiny_recipe


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    r = tiny_recipe(tmp_path, max_iter=30, ims_per_batch=4)
    r["solver"].update(base_lr=0.002, warmup_iters=5, steps=[25])
    r["train"].update(checkpoint_period=10, backend="gloo")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(r))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc-per-node", "2",
           "-m", "regionclip.cli.main", "train", "--config", str(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = Path(r["train"]["output_dir"])
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["total_loss"] for m in lines if "total_loss" in m]
    sums = [m["param_checksums"] for m in lines if "param_checksums" in m]
    print(f"\n2 ranks: loss first 5 {sum(losses[:5]) / 5:.3f} -> last 5 {sum(losses[-5:]) / 5:.3f}; "
          f"weight checksums per rank at iterations 10/20/30: {sums}")
    assert len(losses) == 30
    assert len(sums) == 3 and all(len(s) == 2 and s[0] == pytest.approx(s[1], rel=1e-9) for s in sums)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert json.loads((run / "last_checkpoint").read_text())["iteration"] == 30
