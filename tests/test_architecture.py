"""The package's shape (docs/DESIGN.md#layout): no import cycles between subpackages, no package import hidden in a
function (optional dependencies excepted), modules under 500 lines, design references inside the repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "regionclip"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported regionclip module, imported at module level?) pairs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    guarded = set()  # imports under `if TYPE_CHECKING:` count as module level
    for node in tree.body:
        if isinstance(node, ast.If):
            guarded |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [_resolve(module, node, path.name == "__init__.py")]
        for n in names:
            if n.startswith("regionclip"):
                out.append((n, id(node) in top or id(node) in guarded))
    return out


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles_between_subpackages() -> None:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        src = _subpackage(name)
        for target, _ in _imports(name, path):
            dst = _subpackage(target)
            if dst and src and dst != src:
                graph.setdefault(src, set()).add(dst)
    # a subpackage = a folder; single-file modules are leaves of the graph like any other
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles between subpackages: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_package_import_inside_functions() -> None:
    hidden = [f"{name}: {target}" for name, path in _modules().items()
              for target, top in _imports(name, path) if not top]
    assert not hidden, f"{len(hidden)} regionclip imports inside functions (move them to the top): {hidden[:10]}"


def test_modules_are_small() -> None:
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_design_references_stay_in_the_repository() -> None:
    design = (SRC.parents[1] / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', design))
    bad, missing = [], []
    for p in SRC.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if re.search(r"spec §|\.\./shared/spec", text):
            bad.append(str(p.relative_to(SRC)))
        missing += [f"{p.relative_to(SRC)}#{a}" for a in re.findall(r"DESIGN\.md#([a-z0-9-]+)", text) if a not in anchors]
    assert not bad, f"references to a document outside the repository: {bad}"
    assert not missing, f"references to missing docs/DESIGN.md sections: {missing}"
