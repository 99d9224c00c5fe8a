"""Every flag of every ``regionclip`` subcommand is read by that command (issue 25: no flag accepted and ignored).

A static check, by AST, over the code the command runs: its ``run`` function and every ``regionclip.cli`` function
that ``run`` calls or passes on (transitively, through ``from .common import ...``), plus ``regionclip.cli.main.main``
(the dispatcher reads ``--debug`` / ``--quiet``). A flag's ``dest`` counts as read when that code reads ``args.<dest>`` (or
``getattr(args, "<dest>")``), or - for helpers that read a list of flags through ``getattr(args, key)`` - when the
dest is a string constant in such a function. Assignments (``args.x = ...``) do not count. Whether the value then
reaches the model is checked where it matters by behaviour tests (e.g. ``test_evaluate_rejects_num_workers``).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect

import pytest

from regionclip.cli.main import SUBCOMMANDS, build_parser

NAMESPACE_NAMES = {"args"}  # every cli function names the parsed namespace `args`


FuncKey = tuple[str, str]  # (module, top-level function name)


def _tree(mod_name: str) -> ast.Module:
    return ast.parse(inspect.getsource(importlib.import_module(mod_name)))


def _functions(mod_name: str) -> dict[str, ast.AST]:
    return {n.name: n for n in _tree(mod_name).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _cli_names(mod_name: str) -> dict[str, FuncKey]:
    """Names visible in a cli module that are functions of a cli module: its own and the ones it imports."""
    out = {name: (mod_name, name) for name in _functions(mod_name)}
    for node in ast.walk(_tree(mod_name)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .common import ...
                src = f"regionclip.cli.{node.module}"
            elif node.level == 0 and (node.module or "").startswith("regionclip.cli."):
                src = node.module or ""
            else:
                continue
            funcs = _functions(src)
            out.update({a.asname or a.name: (src, a.name) for a in node.names if a.name in funcs})
    return out


def _reachable(start: FuncKey) -> list[ast.AST]:
    """The function ``start`` and every cli function it calls or passes on (transitively), as AST nodes."""
    seen: set[FuncKey] = set()
    todo, out = [start], []
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        fn = _functions(key[0])[key[1]]
        out.append(fn)
        visible = _cli_names(key[0])
        todo += [visible[n.id] for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in visible]
    return out


def _reads_of(fn: ast.AST) -> set[str]:
    """Namespace attributes one function reads (see the module docstring)."""
    read: set[str] = set()
    for node in ast.walk(fn):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name) and node.value.id in NAMESPACE_NAMES):
            read.add(node.attr)
    dynamic = False
    for call in ast.walk(fn):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "getattr"
                and len(call.args) >= 2 and isinstance(call.args[0], ast.Name)
                and call.args[0].id in NAMESPACE_NAMES):
            if isinstance(call.args[1], ast.Constant):
                read.add(call.args[1].value)
            else:
                dynamic = True
    if dynamic:  # getattr(args, k) over a list of keys: the keys are this function's string constants
        read |= {c.value for c in ast.walk(fn) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return read


def _reads(mod_name: str) -> set[str]:
    """Everything the command reads: its ``run`` and what that reaches, plus ``main`` (``--debug``, ``--quiet``)."""
    fns = _reachable((mod_name, "run")) + _reachable(("regionclip.cli.main", "main"))
    return set().union(*(_reads_of(f) for f in fns))


def _reads_source(src: str) -> set[str]:
    return set().union(*(_reads_of(f) for f in ast.walk(ast.parse(src))
                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))))


def _registered(mod_name: str) -> tuple[str, argparse.ArgumentParser]:
    """(command name, parser) of one subcommand module, registered exactly as ``regionclip.cli.main`` does."""
    sub = argparse.ArgumentParser(prog="regionclip").add_subparsers(dest="command")
    p = importlib.import_module(mod_name).register(sub)
    (name,) = [n for n, q in sub.choices.items() if q is p][:1]
    return name, p


def _flag_dests(p: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag as the user types it (first option string, or the positional's name)."""
    out = {}
    for a in p._actions:
        if isinstance(a, argparse._HelpAction) or a.dest == argparse.SUPPRESS:
            continue
        out[a.dest] = a.option_strings[0] if a.option_strings else a.dest
    return out


def _commands() -> list[tuple[str, str]]:
    return sorted((_registered(m)[0], m) for m in SUBCOMMANDS)


def test_every_subcommand_module_is_walked():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(action.choices) == sorted(name for name, _ in _commands())
    assert len(SUBCOMMANDS) >= 14


@pytest.mark.parametrize("command,mod_name", _commands(), ids=[c for c, _ in _commands()])
def test_every_flag_is_read_by_its_command(command, mod_name):
    dests = _flag_dests(_registered(mod_name)[1])
    assert dests, f"{command}: no flags found (the walker is broken)"
    read = _reads(mod_name)
    ignored = {flag for dest, flag in dests.items() if dest not in read}
    assert not ignored, (f"regionclip {command}: flags accepted but never read by the command: {sorted(ignored)}; "
                         "use them or remove them")


def test_walker_counts_reads_only():
    """The check itself: reads count (attribute, getattr constant, getattr over a key list), assignments do not."""
    src = ("def run(args):\n    x = args.used\n    y = getattr(args, 'also', None)\n    args.assigned = 1\n"
           "def overrides(args):\n    return {k: getattr(args, k) for k in ['listed']}\n")
    read = _reads_source(src)
    assert {"used", "also", "listed"} <= read
    assert "assigned" not in read


def test_evaluate_rejects_num_workers(tmp_path, capsys):
    """``evaluate --num-workers 2`` was accepted and ignored (its loop decodes in the main process): now refused
    with a message naming the flag, before anything is loaded; ``--num-workers 0`` says what happens and is kept."""
    from regionclip.cli.main import main

    rc = main(["evaluate", "--weights", str(tmp_path / "none.pth"), "--images", str(tmp_path), "--num-workers", "2",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--num-workers 2" in err and "main process" in err
    assert not (tmp_path / "out").exists()


def test_extract_regions_honours_max_pixels(tmp_path, capsys):
    """``extract-regions --max-pixels`` was accepted and never reached the pipeline (found by the walk above):
    images over the limit are now skipped as named errors, images under it are extracted."""
    import json

    import torch
    from _region_helpers import random_boxes, tiny_detector, write_images

    from regionclip.cli.main import main
    from regionclip.engine.extract import load_index

    sizes = [(90, 140), (40, 60)]  # 12,600 and 2,400 pixels
    paths = write_images(tmp_path / "imgs", sizes, seed=3)
    torch.save(tiny_detector(seed=10).state_dict(), tmp_path / "tiny.pth")
    boxes = {p.name: random_boxes(3, h, w, seed=i).tolist() for i, (p, (h, w)) in enumerate(zip(paths, sizes))}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    argv = ["extract-regions", str(tmp_path / "imgs"), "--weights", str(tmp_path / "tiny.pth"), "--regions", "boxes",
            "--boxes", str(tmp_path / "boxes.json"), "-o", str(tmp_path / "out"), "--num-workers", "0", "--quiet",
            "--max-pixels", "10000"]
    assert main(argv) == 1  # one image skipped
    index = load_index(tmp_path / "out")
    assert len(index["errors"]) == 1 and "pixel" in json.dumps(index["errors"]).lower()
    assert len(index["images"]) == 1
    assert "1 image(s) skipped" in capsys.readouterr().err
