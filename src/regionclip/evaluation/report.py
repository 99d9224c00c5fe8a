"""Metric tables (column names as in the paper) and the metrics JSON."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ..utils import write_json_atomic

PathLike = Union[str, os.PathLike]

# (column title, metrics key): OVD papers report the split AP50s for COCO and box AP / APr for LVIS.
COCO_OVD_COLUMNS = (("Novel AP50", "novel_AP50"), ("Base AP50", "base_AP50"), ("All AP50", "all_AP50"))
COCO_COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "APs"), ("APm", "APm"), ("APl", "APl"))
LVIS_COLUMNS = (("AP", "AP"), ("APr", "APr"), ("APc", "APc"), ("APf", "APf"))


def _fmt(v: Any) -> str:
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return f"{v:.1f}"
    return "-"


def markdown_table(rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-markdown table: one row per ``(label, metrics)``, one column per ``(title, key)``."""
    header = ["", *[t for t, _ in columns]]
    body = [[label, *[_fmt(m.get(k)) for _, k in columns]] for label, m in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *map(line, body)])


def format_metrics(metrics: Mapping[str, Any], label: str = "ours") -> str:
    """Table(s) for a metrics dict as written by ``regionclip evaluate``: COCO (OVD split first when present) or
    LVIS (``{"bbox": ..., "segm": ...}``)."""
    if "bbox" in metrics and isinstance(metrics["bbox"], Mapping):
        parts = [f"{t} (LVIS)\n" + markdown_table([(label, m)], LVIS_COLUMNS)
                 for t, m in metrics.items() if isinstance(m, Mapping) and "APr" in m]
        if parts:
            return "\n\n".join(parts)
        metrics = metrics["bbox"]
    parts = []
    if "novel_AP50" in metrics:
        parts.append("bbox (OV-COCO)\n" + markdown_table([(label, metrics)], COCO_OVD_COLUMNS))
    parts.append("bbox (COCO)\n" + markdown_table([(label, metrics)], COCO_COLUMNS))
    return "\n\n".join(parts)


def write_metrics_json(metrics: Mapping[str, Any], path: PathLike) -> Path:
    """Write metrics atomically; NaN (no GT in a group) becomes ``null`` so the file is strict JSON."""
    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return write_json_atomic(clean(metrics), path)
