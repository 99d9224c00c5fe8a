"""Shared test fixtures.

Parity fixtures live in ``../shared/parity`` (override with ``REGIONCLIP_SHARED``). Random official-format
checkpoints are generated once per machine into ``REGIONCLIP_TEST_CACHE`` (default
``~/.cache/regionclip-tests``) with the original's ``make_random_ckpt.py`` and reused afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REGIONCLIP_SHARED", REPO.parent / "shared")).resolve()
CACHE = Path(os.environ.get("REGIONCLIP_TEST_CACHE", Path.home() / ".cache" / "regionclip-tests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_checkpoints(variant: str = "rn50", seed: int = 0, rpn_objectness_shift: float = 0.0) -> dict[str, Path]:
    """Paths of the seed-``seed`` random RegionCLIP / RPN / concept-embedding files (generated on first use)."""
    keys = SHARED / "parity" / f"official_{variant}_keys.json"
    if not keys.exists():
        pytest.skip(f"parity key list not found at {keys} (set REGIONCLIP_SHARED to the shared/ folder)")
    out = CACHE / (f"{variant}_seed{seed}" + ("" if not rpn_objectness_shift else f"_shift{rpn_objectness_shift:g}"))
    shift = f"_objshift{rpn_objectness_shift:g}" if rpn_objectness_shift else ""
    paths = {
        "regionclip": out / f"regionclip_random_{variant}_seed{seed}.pth",
        "rpn": out / f"rpn_random_seed{seed}{shift}.pth",
        "concept_emb": out / f"concept_emb_random_{variant}_seed{seed}.pth",
    }
    if not all(p.exists() for p in paths.values()):
        out.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(SHARED / "parity" / "make_random_ckpt.py"), str(keys), "--seed", str(seed),
               "--out-dir", str(tmp)]
        if rpn_objectness_shift:
            cmd += ["--rpn-objectness-shift", str(rpn_objectness_shift)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        for p in paths.values():
            os.replace(tmp / p.name, p)  # atomic: a killed run never leaves a half-written checkpoint
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return paths


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared reference folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def rn50_ckpts() -> dict[str, Path]:
    return random_checkpoints("rn50", 0)


@pytest.fixture(scope="session")
def rn50x4_ckpts() -> dict[str, Path]:
    return random_checkpoints("rn50x4", 0)


@pytest.fixture(scope="session")
def parity_inputs(shared_dir: Path) -> dict:
    return torch.load(shared_dir / "parity" / "refs" / "inputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def parity_gt(shared_dir: Path) -> dict:
    return torch.load(shared_dir / "parity" / "refs" / "rn50_gt.pt", weights_only=True)


@pytest.fixture(scope="session")
def parity_rpn(shared_dir: Path) -> dict:
    return torch.load(shared_dir / "parity" / "refs" / "rn50_rpn.pt", weights_only=True)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    """A tiny official-layout RegionCLIP checkpoint (width-8 trunk, 16-d embeddings); some files define their own."""
    from _region_helpers import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path / "tiny.pth")


@pytest.fixture
def emb_file(tmp_path: Path) -> Path:
    """Three random 16-d class embeddings matching :func:`tiny_ckpt`."""
    p = tmp_path / "emb.pth"
    torch.save(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), p)
    return p


@pytest.fixture
def demo_images() -> list[Path]:
    from regionclip.assets import demo_image_paths

    return demo_image_paths()


# CI (scripts/test.sh) sets REGIONCLIP_NO_SKIPS=1: a skipped test there means something CI should have installed
# is missing (../shared, chromium, open_clip, ...), so it fails the run instead of hiding a gap. The only skip
# allowed is the spaCy model that PyPI does not publish.
ALLOWED_SKIPS = ("en_core_web_sm",)


def _unexpected_skips(config) -> list:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    reports = tr.stats.get("skipped", []) if tr is not None else []
    return [r for r in reports if not any(a in str(getattr(r, "longrepr", "")) for a in ALLOWED_SKIPS)]


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("REGIONCLIP_NO_SKIPS") and exitstatus == 0 and _unexpected_skips(session.config):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest hook signature
    bad = _unexpected_skips(config) if os.environ.get("REGIONCLIP_NO_SKIPS") else []
    if bad:
        terminalreporter.write_line(f"REGIONCLIP_NO_SKIPS: {len(bad)} unexpected skip(s) fail this run: "
                                    + "; ".join(str(getattr(r, "longrepr", r))[:200] for r in bad[:5]), red=True)
