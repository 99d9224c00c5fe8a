"""Small shared helpers: optional-dependency import with an actionable message, atomic JSON writes."""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union


def require(module: str, extra: str, purpose: str = "") -> Any:
    """Import an optional dependency or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f" for {purpose}" if purpose else ""
        raise ImportError(f"{module} is needed{what}: pip install 'regionclip[{extra}]' (or pip install "
                          f"{module.split('.')[0]})") from e


def write_json_atomic(obj: Any, path: Union[str, os.PathLike], **dump_kwargs: Any) -> Path:
    """json.dump to a temp file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
