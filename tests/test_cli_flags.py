"""Every flag of every ``regionclip`` subcommand is read by that command (issue 25: no flag accepted and ignored).

A static check, by AST, over the code the command runs: its ``run`` function and every ``regionclip.cli`` function
that ``run`` calls or passes on (transitively, through ``from .common import ...``), plus ``regionclip.cli.main.main``
(the dispatcher reads ``--debug`` / ``--quiet``). A flag's ``dest`` counts as read when that code reads ``args.<dest>`` (or
``getattr(args, "<dest>")``), or - for helpers that read a list of flags through ``getattr(args, key)`` - when the
dest is a string constant in such a function. Assignments (``args.x = ...``) do not count. Whether the value then
reaches the model is checked where it matters by behaviour tests (e.g.
``test_cli_evaluate_decoding_workers_change_nothing`` in test_real_photos.py).
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


# ---------------------------------------------------------------------------------------------------------------
# Each flag sets exactly one field (issue 25, "one options story"): a run / post-processing flag one field of the
# RunOptions the command runs with (cli.common.run_options), a model flag one field of its LoadOptions
# (cli.common.load_options). Flags that are neither say why, here; the test fails when that list goes stale.
NOT_AN_OPTIONS_FIELD = {
    "vocab": "the vocabulary: RegionCLIP.make_vocabulary, per call (detect(..., vocabulary=))",
    "concept_emb": "the vocabulary's class embeddings: RegionCLIP.make_vocabulary",
    "debug": "tracebacks: the dispatcher (cli.main)",
    "quiet": "progress output of the command",
}
# a value different from every command's default, by dest (store_true flags are simply given)
NON_DEFAULT = {"weights": "w.pth", "rpn_weights": "r.pth", "preset": "coco-gt", "device": "cuda:1",
               "vit_act": "gelu", "text_causal": "no", "score_thresh": "0.37", "nms_thresh": "0.41",
               "detections_per_image": "7", "rpn_score": "sigmoid", "soft_nms": "linear", "batch_size": "3",
               "dtype": "bfloat16", "chunk_size": "5", "max_proposals": "11", "num_workers": "5", "max_pixels": "123",
               "backend": "onnxruntime", "export_dir": "exported/"}


def _common_groups() -> dict[str, str]:
    """dest -> "load" / "run" for every flag cli.common adds (model group: load; run and post-processing: run)."""
    from regionclip.cli import common

    p = argparse.ArgumentParser()
    common.add_model_args(p)
    common.add_run_args(p)
    out = {}
    for g in p._action_groups:
        kind = "load" if g.title == "model" else "run" if g.title == "run" or "post-processing" in (g.title or "") \
            else None
        out.update({a.dest: kind for a in g._group_actions if kind and a.dest not in NOT_AN_OPTIONS_FIELD})
    return out


def _fields(obj) -> dict:
    """An options object as flat {field: value} (RunOptions.postprocess fields as ``postprocess.<name>``)."""
    from dataclasses import fields, is_dataclass

    flat = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        flat.update({f"{f.name}.{k}": w for k, w in _fields(v).items()} if is_dataclass(v) else {f.name: v})
    return flat


def _options_commands() -> list[tuple[str, str]]:
    """The commands whose flags come from cli.common.add_model_args / add_run_args."""
    return [(c, m) for c, m in _commands()
            if "add_model_args(" in inspect.getsource(importlib.import_module(m).register)]


@pytest.mark.parametrize("command,mod_name", _options_commands(), ids=[c for c, _ in _options_commands()])
def test_each_options_flag_sets_exactly_one_field(command, mod_name):
    from types import SimpleNamespace

    from regionclip.api import RegionCLIP
    from regionclip.cli import common
    from regionclip.config import PostprocessConfig

    model = SimpleNamespace(settings=SimpleNamespace(postprocess=PostprocessConfig(), regions="rpn"))
    model.run_options = lambda **kw: RegionCLIP.run_options(model, **kw)
    groups = _common_groups()
    p = _registered(mod_name)[1]
    actions = {a.dest: a for a in p._actions if a.option_strings}
    base = p.parse_args([])

    def options(args, kind):
        return _fields(common.load_options(args) if kind == "load" else common.run_options(model, args))

    checked = set()
    for dest, a in actions.items():
        kind = groups.get(dest)
        if kind is None:
            continue
        flag = a.option_strings[-1]
        argv = [flag] if a.nargs == 0 else [flag, NON_DEFAULT[dest]]
        before, after = options(base, kind), options(p.parse_args(argv), kind)
        changed = sorted(k for k in before if before[k] != after[k])
        assert len(changed) == 1, (f"regionclip {command} {' '.join(argv)}: sets {changed or 'no field'} of its "
                                   f"{'LoadOptions' if kind == 'load' else 'RunOptions'}; a flag sets exactly one")
        checked.add(dest)
    # every flag of cli.common that the command has was checked; the exempt ones exist
    assert checked == set(groups) & set(actions)
    assert set(NOT_AN_OPTIONS_FIELD) <= set(_flag_dests(p)) | {"vocab", "concept_emb"}


def test_demo_load_flags_each_set_one_load_options_field():
    """``regionclip demo`` builds its LoadOptions through cli.common.load_options too (one way from flags to it)."""
    from regionclip.cli import common

    p = _registered("regionclip.cli.demo")[1]
    base = _fields(common.load_options(p.parse_args([])))
    for argv in (["--weights", "w.pth"], ["--rpn-weights", "r.pth"], ["--preset", "coco-gt"], ["--device", "cuda:1"],
                 ["--non-strict"]):
        after = _fields(common.load_options(p.parse_args(argv)))
        assert len([k for k in base if base[k] != after[k]]) == 1, argv
    assert "load_options" in inspect.getsource(importlib.import_module("regionclip.cli.demo").run)


def test_post_processing_at_load_time_is_a_type_error_saying_per_call(tmp_path):
    """Post-processing is a per-call choice: ``from_pretrained(score_thresh=...)`` used to be a second way to set
    it (at load time); now it is refused before anything is loaded, saying how to pass it per call."""
    from regionclip.api import RegionCLIP
    from regionclip.inference.presets import LoadOptions

    with pytest.raises(TypeError, match=r"\['score_thresh'\].*per call.*model\.detect\(images, score_thresh=\.\.\.\)"):
        RegionCLIP.from_pretrained(tmp_path / "never_read.pth", score_thresh=0.1)
    with pytest.raises(TypeError, match=r"model\.run_options\(nms_thresh=\.\.\.\)"):
        LoadOptions.create("w.pth", nms_thresh=0.3)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'chunk'"):
        RegionCLIP.from_pretrained(tmp_path / "never_read.pth", chunk=3)
    assert not (tmp_path / "never_read.pth").exists()


def test_score_thresh_and_chunk_size_reach_the_model_from_argv(tmp_path, demo_images, tiny_ckpt, emb_file,
                                                               monkeypatch, capsys):
    """Follow --score-thresh and --chunk-size from the command line to the values the pipeline passes to
    ``postprocess_detections`` and ``model.encode_regions``: one object each (RunOptions), one direction. The
    printed settings line and the resume fingerprint show the values run with, not the preset's."""
    import json

    import regionclip.pipeline as pipeline_mod
    from regionclip.api import RegionCLIP
    from regionclip.cli.main import main

    thresholds, chunks = [], []
    real_post, real_load = pipeline_mod.postprocess_detections, RegionCLIP.load

    def post_spy(boxes, scores, hw, cfg, **kw):
        thresholds.append(cfg.score_thresh)
        return real_post(boxes, scores, hw, cfg, **kw)

    def load_spy(options):
        model = real_load(options)
        encode = model.detector.encode_regions

        def encode_spy(*a, **kw):
            chunks.append(kw.get("chunk_size"))
            return encode(*a, **kw)

        model.detector.encode_regions = encode_spy
        return model

    monkeypatch.setattr(pipeline_mod, "postprocess_detections", post_spy)
    monkeypatch.setattr(RegionCLIP, "load", staticmethod(load_spy))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({demo_images[0].name: [[100, 100, 900, 700], [1000, 200, 1500, 900],
                                                       [120, 110, 880, 690]]}))
    out = tmp_path / "out"
    argv = ["detect", str(demo_images[0]), "--weights", str(tiny_ckpt), "--preset", "coco-gt", "--boxes", str(boxes),
            "--concept-emb", str(emb_file), "--score-thresh", "0.37", "--chunk-size", "2", "--no-vis",
            "--num-workers", "0", "-o", str(out)]
    assert main(argv) == 0
    assert thresholds == [0.37]  # coco-gt's own is 0.001
    assert chunks and set(chunks) == {2}  # the CPU default would be 64
    err = capsys.readouterr().err
    assert "score>0.37" in err and "score>0.001" not in err  # the settings line shows what runs
    journal = "".join(f.read_text() for f in out.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl"))
    assert "score>0.37" in journal and '"score_thresh": 0.37' in journal  # the resume fingerprint too


def test_backend_is_a_load_option_the_loader_honours(tmp_path, tiny_ckpt, capsys):
    """The backend is a load-time choice in LoadOptions (with the weights, fusion and device), applied by the one
    loading path; ``--int8`` without an export backend was accepted and ignored, now refused before loading."""
    from regionclip.api import RegionCLIP
    from regionclip.cli.main import main

    assert RegionCLIP.from_pretrained(tiny_ckpt).options.backend == "torch"
    with pytest.raises(ValueError, match="onnxruntime backend runs exported graphs"):
        RegionCLIP.from_pretrained(tiny_ckpt, backend="onnxruntime")  # reached make_backend: no export_dir
    rc = main(["detect", "--weights", str(tmp_path / "never_read.pth"), "--int8", "-o", str(tmp_path / "out")])
    assert rc == 2 and "--int8" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_extract_regions_run_flags_reach_extraction_through_one_run_options(tmp_path, monkeypatch):
    """extract-regions builds its ExtractConfig from cli.common.run_options: the run and post-processing flags
    (and its own --pad-mixed-sizes, --topk = --max-proposals) land in ``cfg.run``, the one RunOptions it runs."""
    import json

    import torch
    from _region_helpers import random_boxes, tiny_detector, write_images

    import regionclip.cli.extract_regions as cli_extract
    from regionclip.cli.main import main

    seen = []
    real = cli_extract.extract_regions

    def spy(pipeline, items, out, cfg, **kw):
        seen.append(cfg)
        return real(pipeline, items, out, cfg, **kw)

    monkeypatch.setattr(cli_extract, "extract_regions", spy)
    (path,) = write_images(tmp_path / "imgs", [(40, 60)], seed=1)
    torch.save(tiny_detector(seed=2).state_dict(), tmp_path / "tiny.pth")
    (tmp_path / "boxes.json").write_text(json.dumps({path.name: random_boxes(3, 40, 60, seed=0).tolist()}))
    argv = ["extract-regions", str(tmp_path / "imgs"), "--weights", str(tmp_path / "tiny.pth"), "--regions", "boxes",
            "--boxes", str(tmp_path / "boxes.json"), "-o", str(tmp_path / "out"), "--num-workers", "0", "--quiet",
            "--pad-mixed-sizes", "--topk", "7", "--chunk-size", "2", "--batch-size", "3", "--score-thresh", "0.2"]
    assert main(argv) == 0
    (cfg,) = seen
    run = cfg.run
    assert (run.pad_mixed_sizes, run.max_proposals, run.chunk_size, run.batch_size, run.num_workers) == \
        (True, 7, 2, 3, 0)
    assert run.postprocess.score_thresh == 0.2
    assert not {"topk", "chunk_size", "batch_size", "dtype"} & set(cfg.__dataclass_fields__)  # not repeated
