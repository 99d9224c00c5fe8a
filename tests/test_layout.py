"""The layout of docs/DESIGN.md#layout, executable (issue 25): names say what each place holds.

* no two modules share a file name outside ``cli/`` (``__init__.py`` aside), so a name says one thing;
* the top level of ``src/regionclip`` is the handful of entry points and base modules listed in ``TOP_LEVEL``;
* ``cli/`` holds one file per subcommand, named after it (``train-rpn`` -> ``cli/train_rpn.py``), plus the
  documented helpers in ``CLI_HELPERS``;
* the public names are importable from ``regionclip`` and listed in its ``__all__``;
* the docs that describe this shape (docs/DESIGN.md, docs/DEVELOPING.md, README.md) cite files and functions that
  exist, and DEVELOPING's package map lists every subpackage.

The import rules between these places are tests/test_layering.py; cycles and module size are
tests/test_architecture.py.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
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


ROOT = SRC.parents[1]
DOCS = ("docs/DESIGN.md", "docs/DEVELOPING.md", "README.md")
# `some/file.py` or `some/file.py:name` / `file.py:Class.method`, anywhere in the text (code blocks included)
FILE_REF = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)(?::([A-Za-z_](?:[\w.]*\w)?))?")


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes, assigned names and ``Class.member`` of a module."""
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            if isinstance(node, ast.ClassDef):
                for m in node.body:
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        out.add(f"{node.name}.{m.name}")
                    elif isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name):
                        out.add(f"{node.name}.{m.target.id}")
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def stale_references(text: str, src: Path, root: Path) -> list[str]:
    """File references of ``text`` that name no file, or a name the file does not define. A path is looked up under
    the package, then the repository; a bare file name may also be any module's (a package map lists files by
    name; names are unique outside cli/, whose files mirror the commands)."""
    by_name: dict[str, list[Path]] = defaultdict(list)
    for p in src.rglob("*.py"):
        by_name[p.name].append(p)
    bad = []
    for m in FILE_REF.finditer(text):
        rel, name = m.groups()
        files = [c for c in (src / rel, root / rel) if c.is_file()][:1] or ([] if "/" in rel else by_name[rel])
        if not files:
            bad.append(rel)
        elif name and not any(name in defined_names(f) for f in files):
            bad.append(f"{rel}:{name}")
    return bad


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


@pytest.mark.parametrize("doc", DOCS)
def test_docs_cite_files_and_functions_that_exist(doc: str) -> None:
    bad = stale_references((ROOT / doc).read_text(encoding="utf-8"), SRC, ROOT)
    assert not bad, f"{doc} cites files / names that do not exist (renamed? update the doc): {sorted(set(bad))}"


def test_developing_package_map_lists_every_subpackage() -> None:
    text = (ROOT / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    tree = text.split("```\nsrc/regionclip/\n", 1)[1].split("```", 1)[0]
    listed = set(re.findall(r"^  ([\w]+)/ ", tree, re.M)) | set(re.findall(r"^  ([\w]+\.py) ", tree, re.M))
    actual = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} | \
        {p.name for p in SRC.glob("*.py")}
    assert listed == actual, f"docs/DEVELOPING.md package map: missing {sorted(actual - listed)}, " \
                             f"not in the package {sorted(listed - actual)}"


def test_stale_references_are_found(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "mod.py").write_text("class A:\n    def f(self): ...\n\n\ndef g(): ...\n")
    text = "`sub/mod.py:A.f`, sub/mod.py:g, mod.py:g, sub/mod.py:h, `old.py`, sub/gone.py:A"
    assert stale_references(text, tmp_path / "pkg", tmp_path) == ["sub/mod.py:h", "old.py", "sub/gone.py"]


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
