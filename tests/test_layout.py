"""The layout of docs/DESIGN.md#layout, executable (issue 25): names say what each place holds.

* no two modules share a file name outside ``cli/`` (``__init__.py`` aside), so a name says one thing;
* the top level of ``src/regionclip`` is the handful of entry points and base modules listed in ``TOP_LEVEL``;
* ``cli/`` holds one file per subcommand, named after it (``train-rpn`` -> ``cli/train_rpn.py``), plus the
  documented helpers in ``CLI_HELPERS``;
* the public names are importable from ``regionclip`` and listed in its ``__all__``.

The import rules between these places are tests/test_layering.py; cycles and module size are
tests/test_architecture.py.
"""
from __future__ import annotations

import argparse
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

import regionclip
from test_architecture import SRC

TOP_LEVEL = {  # module -> what it holds (docs/DESIGN.md#layout)
    "__init__": "the public names (__all__)",
    "api": "RegionCLIP: the front door (load once, vocabulary, detect)",
    "predictor": "RegionPredictor: set an image once, ask about any boxes",
    "pipeline": "Pipeline + RunOptions: the one inference path",
    "config": "typed configuration dataclasses",
    "structures": "Detections, Proposals, PreparedImage",
    "utils": "small shared helpers (require, atomic writes)",
}
CLI_HELPERS = {  # cli/ files that are not a subcommand, each with why it exists
    "main": "the `regionclip` console script: SUBCOMMANDS, error handling",
    "common": "arguments shared by the subcommands that run the detector",
    "argtypes": "argparse type= converters that check ranges at parse time",
    "evaluate_metrics": "`evaluate --metric region-accuracy | proposals`: the non-AP half of `evaluate`",
}
PUBLIC = (  # what `from regionclip import X` promises
    "RegionCLIP", "RegionPredictor", "BoxClassification", "Pipeline", "RunOptions", "ImageResult", "LoadOptions",
    "Vocabulary", "resolve_vocabulary", "parse_names", "Detections", "Proposals", "ClipResNetConfig",
    "DetectorConfig", "PostprocessConfig", "RPNConfig", "InputConfig", "build_detector", "load_detector", "PRESETS",
    "WEIGHTS", "__version__",
)


def duplicate_basenames(root: Path) -> dict[str, list[str]]:
    """File name -> the modules that share it, for names used more than once outside ``cli/``."""
    seen: dict[str, list[str]] = defaultdict(list)
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if p.name == "__init__.py" or rel.parts[0] == "cli":
            continue
        seen[p.stem].append(rel.as_posix())
    return {k: v for k, v in seen.items() if len(v) > 1}


def top_level_modules(root: Path) -> set[str]:
    return {p.stem for p in root.glob("*.py")}


def registered_commands() -> dict[str, str]:
    """Module of cli/main.py's SUBCOMMANDS -> the command name its ``register`` adds."""
    from regionclip.cli.main import SUBCOMMANDS

    out = {}
    for mod_name in SUBCOMMANDS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(mod_name).register(sub)
        (command,) = sub.choices  # one subcommand per module
        out[mod_name] = command
    return out


def test_no_two_modules_share_a_name_outside_cli() -> None:
    dups = duplicate_basenames(SRC)
    assert not dups, f"modules sharing a name (rename one so the name says what it holds): {dups}"


def test_top_level_is_the_documented_handful() -> None:
    extra = top_level_modules(SRC) - set(TOP_LEVEL)
    missing = set(TOP_LEVEL) - top_level_modules(SRC)
    assert not extra, f"top-level modules not in docs/DESIGN.md#layout (move them into a subpackage): {sorted(extra)}"
    assert not missing, f"TOP_LEVEL lists modules that do not exist: {sorted(missing)}"


def test_cli_holds_one_file_per_subcommand_named_after_it() -> None:
    commands = registered_commands()
    for mod_name, command in commands.items():
        assert mod_name.rsplit(".", 1)[-1] == command.replace("-", "_"), \
            f"{mod_name} registers `regionclip {command}`: name the file cli/{command.replace('-', '_')}.py"
    files = {p.stem for p in (SRC / "cli").glob("*.py")} - {"__init__"}
    expected = {m.rsplit(".", 1)[-1] for m in commands} | set(CLI_HELPERS)
    assert not files - expected, f"cli/ files that are neither a subcommand nor a documented helper: " \
                                 f"{sorted(files - expected)} (add to SUBCOMMANDS or CLI_HELPERS with why)"
    assert not expected - files, f"listed but missing in cli/: {sorted(expected - files)}"


def test_public_names_are_exported() -> None:
    assert len(regionclip.__all__) == len(set(regionclip.__all__)), "duplicates in regionclip.__all__"
    missing = [n for n in PUBLIC if n not in regionclip.__all__]
    assert not missing, f"public names missing from regionclip.__all__: {missing}"
    for name in regionclip.__all__:
        assert getattr(regionclip, name, None) is not None, f"regionclip.__all__ lists {name!r}, not importable"
    from regionclip.predictor import RegionPredictor
    from regionclip.text.vocabulary import resolve_vocabulary

    assert regionclip.RegionPredictor is RegionPredictor and regionclip.resolve_vocabulary is resolve_vocabulary


@pytest.mark.parametrize("case", ["dup", "top", "ok"])
def test_layout_rules_catch_violations(tmp_path: Path, case: str) -> None:
    """The rules themselves, on a made-up tree: a second ``boxes.py``, a stray top-level module."""
    root = tmp_path / "regionclip"
    for rel in ("__init__.py", "api.py", "ops/__init__.py", "ops/boxes.py", "cli/__init__.py", "cli/boxes.py",
                "data/__init__.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    if case == "dup":
        (root / "data" / "boxes.py").write_text("")
        assert duplicate_basenames(root) == {"boxes": ["data/boxes.py", "ops/boxes.py"]}
    elif case == "top":
        (root / "runtime.py").write_text("")
        assert top_level_modules(root) - set(TOP_LEVEL) == {"runtime"}
    else:  # cli/ may repeat a name (its files mirror the commands); __init__.py never counts
        assert duplicate_basenames(root) == {} and top_level_modules(root) <= set(TOP_LEVEL)
