"""Drawing detections with PIL: the original's ``tools/visualize_json_results.py`` selection rules (docs/DESIGN.md#visualisation), plus
readable labels, per-class colours, side-by-side comparison of several results files and a grid of images.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont

from ..structures import Detections
from ..utils import atomic_path
from .results import ResultsError, load_results, validate_results

PathLike = Union[str, os.PathLike]
Color = tuple[int, int, int]


def select_predictions(preds: Sequence[dict], *, conf_threshold: float = 0.5, show_unique_boxes: bool = False,
                       max_boxes: int = 30, small_region_px: float = 0.0) -> list[dict]:
    """The predictions of one image that the original draws (docs/DESIGN.md#visualisation), in input order.

    Without ``show_unique_boxes``: every prediction with score > ``conf_threshold`` (``max_boxes`` and
    ``small_region_px`` are ignored, as in the original). With it: take the first ``max_boxes`` predictions *in
    JSON order* (the original assumes score order), drop those whose XYWH area w*h < ``small_region_px``, drop
    repeats of an already kept identical ``bbox`` (so each box shows once, with its first = best class), then apply
    the score threshold.
    """
    if not show_unique_boxes:
        return [p for p in preds if p["score"] > conf_threshold]
    kept: list[dict] = []
    seen: set[tuple[float, ...]] = set()
    for p in list(preds)[:max_boxes]:
        w, h = p["bbox"][2], p["bbox"][3]
        if w * h < small_region_px:
            continue
        key = tuple(float(v) for v in p["bbox"])
        if key in seen:
            continue
        seen.add(key)
        kept.append(p)
    return [p for p in kept if p["score"] > conf_threshold]


def class_color(key: int) -> Color:
    """A saturated colour per class, stable across images and runs (golden-ratio hue steps)."""
    hue = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


#: Default bound on the longest side of drawn images: a 108 MP photo would otherwise give a ~90 MB JPEG.
MAX_SIDE = 2048


def bounded_size(size: tuple[int, int], max_side: Optional[int]) -> tuple[int, int]:
    """PIL (w, h) scaled (aspect kept, rounded, >= 1 px) so that the longer side is <= ``max_side``; unchanged when
    it already fits or ``max_side`` is None."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
               colors: Sequence[Color], *, line_width: Optional[int] = None, font_size: Optional[int] = None,
               max_side: Optional[int] = MAX_SIDE, source_size: Optional[tuple[int, int]] = None) -> Image.Image:
    """A copy of ``image`` with XYXY ``boxes`` outlined in ``colors`` and a filled label tag above each box
    (inside it when there is no room above). Sizes default to values readable at the image's resolution.

    ``boxes`` are in pixels of ``image``, or of an image of PIL size ``source_size`` (w, h) when ``image`` is a
    reduced decode of it (e.g. :func:`regionclip.data.images.decode_image` with a target size). An image whose
    longer side exceeds ``max_side`` is drawn on a downscaled copy (boxes scaled to it), so the output is at most
    ``max_side`` px on its longer side; ``None`` keeps the full resolution."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = rgb.size
    nw, nh = bounded_size((w, h), max_side)
    if (nw, nh) != (w, h):
        # bilinear with PIL's antialiasing; the reducing_gap pre-reduction keeps huge images fast
        out = rgb.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    else:
        out = rgb.copy() if rgb is image else rgb
    src_w, src_h = source_size or (w, h)
    if (src_w, src_h) != (nw, nh):
        sx, sy = nw / src_w, nh / src_h
        boxes = [[float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy] for b in boxes]
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    lw = line_width or max(2, round(short / 300))
    font = _font(font_size or max(12, short // 45))
    for box, text, color in zip(boxes, labels, colors):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=lw)
        if not text:
            continue
        left, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - left + 2 * lw, b - t + 2 * lw
        ty = y0 - th if y0 - th >= 0 else y0 + lw
        tx = min(max(x0, 0), max(out.size[0] - tw, 0))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        # black on light colours, white on dark ones
        luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx + lw - left, ty + lw - t), text, fill=(0, 0, 0) if luma > 140 else (255, 255, 255), font=font)
    return out


def draw_results(image: Image.Image, preds: Sequence[dict], names: Mapping[int, str], *,
                 max_side: Optional[int] = MAX_SIDE, source_size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Draw results-JSON predictions (``bbox`` XYWH, ``category_id``, ``score``) with ``names[category_id]``;
    output bounded to ``max_side`` px, boxes relative to ``source_size`` (see :func:`draw_boxes`)."""
    boxes = [[p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2], p["bbox"][1] + p["bbox"][3]] for p in preds]
    labels = [f"{names.get(p['category_id'], p['category_id'])} {p['score']:.2f}" for p in preds]
    return draw_boxes(image, boxes, labels, [class_color(int(p["category_id"])) for p in preds], max_side=max_side,
                      source_size=source_size)


def draw_detections(image: Image.Image, det: Detections, *, conf_threshold: float = 0.0,
                    max_side: Optional[int] = MAX_SIDE, source_size: Optional[tuple[int, int]] = None
                    ) -> Image.Image:
    """Draw a :class:`Detections` (boxes in original pixels of ``image``, or of ``source_size`` (w, h) when
    ``image`` is a reduced decode); output bounded to ``max_side`` px."""
    keep = [i for i, s in enumerate(det.scores.tolist()) if s > conf_threshold]
    names = det.names
    labels = [f"{names[i]} {float(det.scores[i]):.2f}" for i in keep]
    return draw_boxes(image, [det.boxes[i].tolist() for i in keep], labels,
                      [class_color(int(det.labels[i])) for i in keep], max_side=max_side, source_size=source_size)


def tile(images: Sequence[Image.Image], columns: int, *, titles: Optional[Sequence[str]] = None,
         cell_width: Optional[int] = None, gap: int = 8) -> Image.Image:
    """Images in a grid of ``columns`` columns (scaled to a common width), with optional titles above each."""
    if not images:
        raise ValueError("nothing to tile: no images")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cw = cell_width or max(im.size[0] for im in images)
    scaled = [im.convert("RGB").resize((cw, max(1, round(im.size[1] * cw / im.size[0])))) for im in images]
    font = _font(max(14, cw // 40))
    title_h = (int(font.getbbox("Ag")[3]) + 2 * gap) if titles else 0  # FreeType bboxes are typed float
    rows = [scaled[i:i + columns] for i in range(0, len(scaled), columns)]
    row_h = [max(im.size[1] for im in row) + title_h for row in rows]
    canvas = Image.new("RGB", (columns * cw + (columns + 1) * gap, sum(row_h) + (len(rows) + 1) * gap), "white")
    draw = ImageDraw.Draw(canvas)
    y = gap
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            x = gap + c * (cw + gap)
            if titles:
                draw.text((x, y + gap // 2), titles[r * columns + c], fill=(0, 0, 0), font=font)
            canvas.paste(im, (x, y + title_h))
        y += row_h[r] + gap
    return canvas


def _group(results: Sequence[dict]) -> dict[Any, list[dict]]:
    by_image: dict[Any, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def _load_source(src: object, k: int) -> tuple[str, str, list[dict]]:
    """(label for error messages, panel title, predictions) of the ``k``-th results source: a results JSON path or
    an in-memory list of prediction dicts."""
    if isinstance(src, (str, os.PathLike)):
        return str(src), Path(src).stem, load_results(src)
    if isinstance(src, (list, tuple)):
        return f"results {k}", f"results {k}", list(src)
    raise TypeError(f"results {k}: expected a results JSON path or a list of prediction dicts, got {type(src).__name__}")


def render_results(results: Union[PathLike, Sequence[dict], Sequence[Union[PathLike, Sequence[dict]]]],
                   images: Sequence[tuple[Any, PathLike]], names: Mapping[int, str], output_dir: PathLike, *,
                   conf_threshold: float = 0.5, show_unique_boxes: bool = False, max_boxes: int = 30,
                   small_region_px: float = 0.0, image_format: Optional[str] = None,
                   grid_columns: Optional[int] = None, titles: Optional[Sequence[str]] = None,
                   max_side: Optional[int] = MAX_SIDE) -> list[Path]:
    """Draw one or several results files on the dataset images and write them to ``output_dir``.

    Args:
        results: a results JSON path / list, or a list of those (several -> side by side per image).
        images: ``(image_id, path)`` of every image to draw, in order (images without predictions are drawn bare,
            as the original does).
        names: category id -> label text.
        output_dir: written as ``<output_dir>/<image file name>`` (suffix replaced by ``image_format``,
            e.g. ``"png"``), plus ``grid.<ext>`` when ``grid_columns`` is given.
        titles: panel titles for side-by-side mode (default: file stems / "results i").
        max_side: longest side of each drawn panel (larger images are drawn downscaled); None = full size.
    """
    sources: Sequence[object] = [results]
    if isinstance(results, (list, tuple)) and results and not isinstance(results[0], dict):
        sources = results  # several sources, drawn side by side
    loaded = [_load_source(src, k) for k, src in enumerate(sources)]
    known_ids = [i for i, _ in images]
    grouped = []
    for label, _, preds in loaded:
        validate_results(preds, known_ids, names.keys(), source=label, allow_empty=True)
        grouped.append(_group(preds))
    if titles is None:
        titles = [title for _, title, _ in loaded]
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rendered: list[Image.Image] = []
    for image_id, path in images:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
        panels = [draw_results(im, select_predictions(g.get(image_id, []), conf_threshold=conf_threshold,
                                                      show_unique_boxes=show_unique_boxes, max_boxes=max_boxes,
                                                      small_region_px=small_region_px), names,
                               max_side=max_side) for g in grouped]
        out = panels[0] if len(panels) == 1 else tile(panels, len(panels), titles=titles)
        name = Path(path).name if image_format is None else f"{Path(path).stem}.{image_format.lstrip('.')}"
        written.append(_save(out, out_dir / name))
        if grid_columns:
            rendered.append(out)
    if grid_columns and rendered:
        ext = image_format or "jpg"
        grid = tile(rendered, grid_columns, titles=[Path(p).name for _, p in images],
                    cell_width=min(960, max(im.size[0] for im in rendered)))
        written.append(_save(grid, out_dir / f"grid.{ext.lstrip('.')}"))
    return written


def _save(image: Image.Image, path: Path) -> Path:
    """Save via a temp name + rename so an interrupted run leaves no truncated image under the final name."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported output format {path.suffix!r}; use jpg, png, webp or bmp")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


__all__ = ["MAX_SIDE", "bounded_size", "select_predictions", "class_color", "draw_boxes", "draw_results", "draw_detections", "tile",
           "render_results", "ResultsError"]
