"""The exported runtimes leave the process sound for what runs after them (docs/DEVELOPING.md#known-issues).

Root cause of the single-process suite crash: every ``openvino.Core`` loads its own CPU plugin, which swaps the
calling thread's alternate signal stack (``sigaltstack``) for a fresh mmap on its first compile and restores the
one it replaced when destroyed, but only if its own is still installed. Plugins destroyed in creation order leave
the main thread's alternate stack pointing at unmapped memory; the next signal that has a Python handler (Python
installs every handler with ``SA_ONSTACK``; torch's DataLoader handles SIGCHLD) is then pushed onto it: SIGSEGV,
or the kernel's ~3 KB signal frame written into whatever was mapped there since (the "corrupted heap type").

Each check runs in a fresh interpreter (the failure kills the process, and pytest's own faulthandler stack must not
mask the state under test); the child prints the thread's alternate stack and whether it is mapped.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack and /proc/self/maps are Linux")

TESTS = Path(__file__).resolve().parent

# the thread's alternate signal stack, read with sigaltstack(2), and whether /proc/self/maps still maps it
ALTSTACK = textwrap.dedent("""
    import ctypes, gc, signal, subprocess, sys

    class _Stack(ctypes.Structure):
        _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    def altstack_state():
        st = _Stack()
        if ctypes.CDLL(None, use_errno=True).sigaltstack(None, ctypes.byref(st)) != 0:
            raise OSError(ctypes.get_errno(), "sigaltstack")
        if st.flags & 2:  # SS_DISABLE: signals run on the thread's own stack
            return "disabled"
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= st.sp < hi:
                return "mapped"
        return f"UNMAPPED {st.sp:#x}+{st.size}"

    def tiny_ir(path):
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops
        x = ops.parameter([-1, 4], np.float32, name="x")
        ov.save_model(ov.Model([ops.relu(x)], [x]), path)
        return path

    def child_exit_with_python_sigchld_handler():
        signal.signal(signal.SIGCHLD, lambda *a: None)  # as torch's DataLoader does for its workers
        out = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "child", out
""")


def run_child(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + ALTSTACK + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)


def report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def test_openvino_runners_dropped_in_creation_order_keep_the_signal_stack(tmp_path: Path) -> None:
    """Three OpenVINO runners (as one ExportedRegionModel opens trunk, region head and RPN) dropped oldest first,
    then a child process exits while a Python SIGCHLD handler is installed: the process survives."""
    pytest.importorskip("openvino", reason="pip install 'regionclip[openvino]'")
    proc = run_child(f"""
        import numpy as np
        from regionclip.export.runtime import OpenVinoRunner
        import torch
        path = tiny_ir({str(tmp_path / "relu.xml")!r})
        runners = [OpenVinoRunner(path) for _ in range(3)]
        for i in range(3):  # no loop variable may keep the last runner alive
            assert runners[i]({{"x": torch.tensor([[-1.0, 2.0, -3.0, 4.0]])}})[0].tolist() == [[0.0, 2.0, 0.0, 4.0]]
        while runners:
            del runners[0]  # oldest first
            gc.collect()
        print("altstack:", altstack_state(), flush=True)
        child_exit_with_python_sigchld_handler()
        print("survived", flush=True)
    """, tmp_path)
    assert proc.returncode == 0 and "survived" in proc.stdout, report(proc)
    assert "UNMAPPED" not in proc.stdout, report(proc)


def test_export_onnxruntime_openvino_then_dataloader_and_subprocess_in_one_process(tmp_path: Path) -> None:
    """The issue's scenario in one interpreter: export a tiny detector, run it on ONNX Runtime and twice on OpenVINO
    (two ExportedRegionModels, dropped), then a DataLoader with a worker (installs torch's SIGCHLD handler) and
    ``subprocess.run``, as tests/test_extract.py does after tests/test_export.py in a single-process suite."""
    pytest.importorskip("onnxruntime", reason="pip install 'regionclip[onnx]'")
    pytest.importorskip("openvino", reason="pip install 'regionclip[openvino]'")
    proc = run_child(f"""
        import torch
        from _region_helpers import tiny_detector
        from regionclip.export import export_model, make_backend
        det = tiny_detector(0)
        out = {str(tmp_path / "exp")!r}
        export_model(det, out, fmt="onnx", include_rpn=False)
        feats = torch.randn(1, det.backbone.layer3[-1].conv3.out_channels, 6, 8)
        boxes = [torch.tensor([[0.0, 0.0, 60.0, 50.0], [10.0, 5.0, 100.0, 90.0]])]
        with torch.no_grad():
            ref, _ = det.encode_regions(feats, boxes, chunk_size=256)
        for backend in ("onnxruntime", "openvino", "openvino"):
            model = make_backend(det, backend, out)
            emb, _ = model.encode_regions(feats, boxes, chunk_size=256)
            torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
            del model
            gc.collect()
        print("altstack:", altstack_state(), flush=True)
        loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1)
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
        del loader
        child_exit_with_python_sigchld_handler()
        print("survived", flush=True)
    """, tmp_path)
    assert proc.returncode == 0 and "survived" in proc.stdout, report(proc)
    assert "UNMAPPED" not in proc.stdout, report(proc)


def test_upstream_openvino_plugins_still_restore_a_freed_signal_stack(tmp_path: Path) -> None:
    """The upstream bug the shared Core fences off (OpenVINO intel_cpu ``SigAltStackSetup``): two Cores, each
    compiled once, destroyed oldest first, leave the thread's alternate signal stack unmapped. When this fails,
    OpenVINO has fixed it: regionclip.export.runtime.openvino_core() and this test may go."""
    pytest.importorskip("openvino", reason="pip install 'regionclip[openvino]'")
    proc = run_child(f"""
        import openvino as ov
        path = tiny_ir({str(tmp_path / "relu.xml")!r})
        held = []
        for _ in range(2):
            core = ov.Core()
            held.append((core, core.compile_model(path, "CPU")))
            del core
        print("before:", altstack_state(), flush=True)
        while held:
            del held[0]
            gc.collect()
        print("after:", altstack_state(), flush=True)
    """, tmp_path)
    assert proc.returncode == 0, report(proc)
    assert "before: mapped" in proc.stdout and "after: UNMAPPED" in proc.stdout, (
        "OpenVINO no longer leaves a dangling sigaltstack: the shared-Core fence may be removed\n" + report(proc))
