"""The layering of docs/DESIGN.md#layout as an executable import contract (issue 25), checked by AST like
tests/test_architecture.py (which checks cycles, module size and regionclip imports hidden in functions).

Three rules:

1. Layers: each unit (a subpackage or a top-level module) imports only the units DESIGN.md lets it import.
2. Weights: below the front doors, only ``factory`` (driving ``checkpoint``) reads model-weight files - no
   ``checkpoint.io`` loader (``load_into``, ``load_state_dict``, ``read_weight_file``) and no ``torch.load`` call.
   Documented exceptions: ``text.vocabulary`` reads class-embedding files (vocabulary data stored in a weight-file format)
   and ``weights.hub`` converts files to files (``regionclip convert``) without building a module.
3. Function-level imports only for optional dependencies (and platform-only standard modules such as ``fcntl``):
   required packages and the standard library are imported at module level.

Code owned elsewhere that breaks a rule today is listed in ``KNOWN_*`` below, each with why; the tests assert every
listed violation still exists, so fixing one fails here until it is deleted from the list (the list cannot go
stale), and a new violation fails as usual.
"""
from __future__ import annotations

import ast
from pathlib import Path

import test_architecture
from test_architecture import _imports, _subpackage

BASE = {"config", "structures", "utils", "ops", "assets"}
LOW = BASE | {"checkpoint", "losses", "modeling", "text", "data", "factory", "formats"}
# settings / resolution layer ("vocab, presets, postprocess, runtime" in DESIGN.md) and the process helpers beside it
MID = {"inference", "parallel", "weights"}  # settings + selection + hardware; torchrun helpers; weight files
INFERENCE = {"pipeline", "export"}  # the one inference path and its exported-graph backends
FRONT_DOORS = {"api", "predictor"}
FRONT_ENDS = {"evaluation", "engine", "cli", "demo", "search"}

# unit -> the units it may import (its own unit always allowed); docs/DESIGN.md#layout, line by line
ALLOWED: dict[str, set[str]] = {
    **{u: BASE for u in BASE},  # base units import each other (no cycles: test_architecture)
    "checkpoint": BASE,
    "losses": BASE,
    "modeling": BASE | {"losses"},
    "text": BASE | {"modeling", "checkpoint"},
    "data": BASE,  # + text for captions only: see DATA_TEXT
    "factory": BASE | {"checkpoint", "modeling"},
    "formats": BASE,
    **{u: LOW | MID for u in MID},
    **{u: LOW | MID | INFERENCE for u in INFERENCE},
    **{u: LOW | MID | INFERENCE | FRONT_DOORS for u in FRONT_DOORS},
    **{u: LOW | MID | INFERENCE | FRONT_DOORS | FRONT_ENDS - {"cli"} for u in FRONT_ENDS},
}
ALLOWED["cli"] = ALLOWED["cli"] | {"cli"}
DATA_TEXT = {"regionclip.data.captions"}  # "data -> base (+ text for captions)"

# (importing module, imported unit): violations in code owned by other sessions, to be fixed there
KNOWN_LAYER_VIOLATIONS: set[tuple[str, str]] = set()

WEIGHT_LOADERS = {"load_into", "load_state_dict", "read_weight_file"}
WEIGHT_READERS_ALLOWED = {"factory", "checkpoint"} | FRONT_DOORS | FRONT_ENDS
WEIGHT_EXCEPTIONS = {
    "regionclip.text.vocabulary",  # class-embedding files: vocabulary data (docs/DESIGN.md#class-embeddings)
    "regionclip.weights.hub",  # `regionclip convert`: file -> .safetensors file, builds no module
}
KNOWN_WEIGHT_VIOLATIONS: set[str] = set()

REQUIRED = {"torch", "torchvision", "numpy", "PIL", "yaml", "ftfy", "regex", "tqdm", "safetensors"}  # pyproject [project] dependencies
OPTIONAL_SUBMODULES = ("torch.utils.tensorboard",)  # needs the optional tensorboard package
PLATFORM_ONLY = {"fcntl", "msvcrt", "ctypes", "signal", "resource", "termios"}  # may be absent: imported where used
KNOWN_FUNCTION_IMPORTS: set[tuple[str, str]] = set()  # (module, imported top-level package)


def _unit(module: str) -> str:
    return _subpackage(module)


def _layer_violations() -> set[tuple[str, str]]:
    out = set()
    for name, path in test_architecture._modules().items():
        src = _unit(name)
        if not src:
            continue
        assert src in ALLOWED, f"{name}: unit {src!r} is not placed in a layer (add it to ALLOWED and DESIGN.md)"
        for target, _ in _imports(name, path):
            dst = _unit(target)
            if not dst or dst == src or dst in ALLOWED[src]:
                continue
            if src == "data" and dst == "text" and name in DATA_TEXT:
                continue
            out.add((name, dst))
    return out


def _weight_readers() -> set[str]:
    out = set()
    for name, path in test_architecture._modules().items():
        if _unit(name) in WEIGHT_READERS_ALLOWED or name in WEIGHT_EXCEPTIONS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name in WEIGHT_LOADERS for a in node.names) \
                    and (node.module or "").endswith("io"):
                out.add(name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                out.add(name)
    return out


def _function_imports() -> set[tuple[str, str]]:
    """(module, top-level package) of required or standard-library imports inside functions."""
    out = set()
    for name, path in test_architecture._modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.If, ast.Try))
               for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in top:
                continue
            if isinstance(node, ast.Import):
                full = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                full = [node.module or ""]
            else:
                continue
            for root in [m.split(".")[0] for m in full if not m.startswith(OPTIONAL_SUBMODULES)]:
                if root in REQUIRED or (root in _STDLIB and root not in PLATFORM_ONLY):
                    out.add((name, root))
    return out


_STDLIB = set(__import__("sys").stdlib_module_names)


def _check(found: set, known: set, what: str) -> None:
    new = sorted(found - known)
    fixed = sorted(known - found)
    assert not new, f"{what}: {new} (docs/DESIGN.md#layout)"
    assert not fixed, f"{what}: fixed, delete from the KNOWN list in tests/test_layering.py: {fixed}"


def test_layers() -> None:
    _check(_layer_violations(), KNOWN_LAYER_VIOLATIONS, "imports across the layers")


def test_only_factory_reads_weights() -> None:
    _check(_weight_readers(), KNOWN_WEIGHT_VIOLATIONS, "modules below the front doors reading weight files")


def test_function_level_imports_only_for_optional_dependencies() -> None:
    _check(_function_imports(), KNOWN_FUNCTION_IMPORTS, "required / standard-library imports inside functions")


def test_every_unit_has_a_layer() -> None:
    units = {_unit(n) for n in test_architecture._modules()} - {""}
    assert units <= set(ALLOWED), f"units without a layer: {sorted(units - set(ALLOWED))}"
    assert not (set(ALLOWED) - units), f"layers name units that do not exist: {sorted(set(ALLOWED) - units)}"


def test_rules_catch_violations(tmp_path: Path, monkeypatch) -> None:
    """The contract itself: a model module importing a front door, a text module reading weights and a function
    importing torch are all reported."""
    pkg = tmp_path / "regionclip"
    for sub in ("modeling", "text", "checkpoint"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("")
    (pkg / "modeling" / "bad.py").write_text("from ..api import RegionCLIP\n")
    (pkg / "text" / "bad.py").write_text("from ..checkpoint.io import read_weight_file\n\n\ndef f():\n"
                                         "    import torch\n    import fcntl\n    return torch.load('x')\n")
    monkeypatch.setattr("test_architecture.SRC", pkg)
    assert _layer_violations() == {("regionclip.modeling.bad", "api")}
    assert _weight_readers() == {"regionclip.text.bad"}
    assert _function_imports() == {("regionclip.text.bad", "torch")}  # fcntl: platform-only, allowed
