"""Small shared helpers: optional-dependency import with an actionable message, atomic JSON writes, the compute-dtype
table."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch


def require(module: str, extra: str, purpose: str = "") -> Any:
    """Import an optional dependency or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f" for {purpose}" if purpose else ""
        raise ImportError(f"{module} is needed{what}: pip install 'regionclip[{extra}]' (or pip install "
                          f"{module.split('.')[0]})") from e


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success rename it to ``path``, on any error delete it. Readers
    never see a half-written file, and a killed process leaves only a hidden ``.name.*.tmp`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the final file the permissions an ordinary open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(obj: Any, path: Union[str, os.PathLike], **dump_kwargs: Any) -> Path:
    """json.dump through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)
    return Path(path)


# The one dtype table: the compute dtypes a run may use (RunOptions.dtype), by name. Everything else derives from
# it: the requestable CLI/API names add "auto" (regionclip.inference.hardware.REQUESTABLE_DTYPES), the region store's
# save dtypes (regionclip.engine.extract) are these names.
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES: tuple[str, ...] = tuple(TORCH_DTYPES)


def autocast_context(device: Any, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for 16-bit compute (``float32``: a no-op). bfloat16 works on CPU and GPU; float16 only on GPU."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 autocast is for GPUs; on the CPU use --dtype bfloat16 (or float32)")
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


_LOCKED: set[str] = set()  # lock files this process holds (POSIX locks do not conflict within one process)


class DirLock:
    """A held :func:`lock_dir` lock; :meth:`close` releases it (the OS also does when the process dies)."""

    def __init__(self, f: Any, key: str) -> None:
        self._f, self._key = f, key

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            _LOCKED.discard(self._key)

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def lock_dir(path: Union[str, os.PathLike], name: str = ".lock", *, what: str = "run") -> DirLock:
    """An exclusive lock on ``path/<name>`` for the output folder of a long command (``extract-regions``,
    ``detect``), released by the OS when the process dies (also on SIGKILL). A second run on the same folder gets
    a RuntimeError naming the folder instead of doing the same work twice into the same journal.

    A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers do not inherit it, so a worker that
    outlives a killed parent for a few seconds cannot block the resumed run."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = str((path / name).resolve())
    busy = f"another {what} is writing to {path}; wait for it to finish or use another --output-dir"
    if key in _LOCKED:  # POSIX locks do not conflict within one process (and closing a 2nd fd would drop them)
        raise RuntimeError(busy)
    f = open(path / name, "w")
    try:
        import fcntl

        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - Windows: no lock, concurrent runs are the user's responsibility
        pass
    except OSError:
        f.close()
        raise RuntimeError(busy) from None
    _LOCKED.add(key)
    return DirLock(f, key)


_FORK_GUARD_INSTALLED = False


def quiet_forked_children() -> None:
    """Make Ctrl-C end a command with its one message, never with a stray traceback from a forked worker.

    Ctrl-C sends SIGINT to every process of the terminal's group, DataLoader workers included. A worker hit while
    it is being forked raises KeyboardInterrupt inside Python's at-fork callbacks (e.g. logging's lock release):
    its traceback is printed and the parent then fails with "DataLoader worker exited unexpectedly"; the parent hit
    in the same window loses the interrupt ("Exception ignored in ...") and runs on. So, around every fork:
    SIGINT is blocked before the fork; the child ignores SIGINT (its parent stops it) and unblocks, dropping a
    pending one; the parent unblocks, receiving a pending one as an ordinary KeyboardInterrupt after the fork. The
    masks are set through libc, not :func:`signal.pthread_sigmask`, which would raise the pending interrupt inside
    the at-fork callback. Linux/macOS fork only (spawned children start their own interpreter); idempotent.
    """
    global _FORK_GUARD_INSTALLED
    import signal

    if _FORK_GUARD_INSTALLED or not hasattr(os, "register_at_fork") or not hasattr(signal, "SIG_BLOCK"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sigset = ctypes.c_ubyte * 128  # >= sizeof(sigset_t) on Linux (128) and macOS (4)
        block, saved = sigset(), sigset()
        libc.sigemptyset(ctypes.byref(block))
        libc.sigaddset(ctypes.byref(block), int(signal.SIGINT))
        mask = libc.pthread_sigmask
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols: keep the default behaviour
        return

    def before() -> None:
        mask(int(signal.SIG_BLOCK), ctypes.byref(block), ctypes.byref(saved))

    def after_in_parent() -> None:
        mask(int(signal.SIG_SETMASK), ctypes.byref(saved), None)

    def after_in_child() -> None:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # forked from a thread other than the main one: Python cannot set handlers there
            pass
        mask(int(signal.SIG_SETMASK), ctypes.byref(saved), None)

    os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)
    _FORK_GUARD_INSTALLED = True
