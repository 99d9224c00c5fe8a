"""Every flag of every ``regionclip`` subcommand is read by that command (issue 25: no flag accepted and ignored).

A static check, by AST, over the command's own code: the subcommand module plus the ``regionclip.cli`` modules it
imports (transitively), and ``regionclip.cli.main`` (the dispatcher reads ``--debug`` / ``--quiet``). A flag's ``dest`` counts as read when that code reads ``args.<dest>`` (or
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


def _cli_closure(mod_name: str) -> list[str]:
    """The module and the regionclip.cli modules it imports, transitively."""
    seen: list[str] = []
    todo = [mod_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .common import ...
                    todo.append(f"regionclip.cli.{node.module}")
                elif node.module and node.module.startswith("regionclip.cli."):
                    todo.append(node.module)
    return seen


def _reads(mod_names: list[str]) -> set[str]:
    """Attribute names read from the namespace in these modules (see the module docstring)."""
    read: set[str] = set()
    for name in mod_names:
        read |= _reads_source(inspect.getsource(importlib.import_module(name)))
    return read


def _reads_source(src: str) -> set[str]:
    read: set[str] = set()
    tree = ast.parse(src)
    if True:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name) and node.value.id in NAMESPACE_NAMES):
                read.add(node.attr)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
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
    read = _reads(_cli_closure(mod_name) + ["regionclip.cli.main"])  # main reads --debug / --quiet for all
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
