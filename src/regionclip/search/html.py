"""Crops of search hits and a self-contained HTML contact sheet (thumbnails embedded as base64 JPEG: the file
opens from disk in any browser, no server, and can be mailed as one file)."""
from __future__ import annotations

import base64
import html
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageOps

from ..utils import atomic_path
from .index import Hit

PathLike = Union[str, os.PathLike]


def resolve_image(hit: Hit, image_root: Optional[PathLike] = None) -> Optional[Path]:
    """The image file of a hit: ``image_root/file_name``, ``image_root/key``, the path recorded at index time, or
    ``file_name`` as is (absolute, or relative to the working folder); None when none exists."""
    cands: list[Path] = []
    if image_root is not None:
        root = Path(image_root)
        cands += [root / hit.file_name, root / Path(hit.file_name).name, root / hit.key]
    if hit.path:
        cands.append(Path(hit.path))
    cands.append(Path(hit.file_name))
    return next((c for c in cands if c.is_file()), None)


@lru_cache(maxsize=8)  # hits of one image come together often; keep a few decoded images around
def _open_rgb(path: str) -> Any:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")  # the frame the detector saw (EXIF-rotated)


def crop_region(image: Any, box: Sequence[float], *, margin: float = 0.1, min_margin: int = 4,
                thumb: int = 224, outline: bool = True) -> Any:
    """The region ``box`` (XYXY original pixels) of a PIL image with a margin (``margin`` x box size, at least
    ``min_margin`` px), clipped to the image, its box outlined in red, scaled to fit ``thumb`` x ``thumb`` (crops
    smaller than half of that are enlarged to half)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mx = max(min_margin, margin * (x2 - x1))
    my = max(min_margin, margin * (y2 - y1))
    w, h = image.size
    cx1, cy1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    cx2, cy2 = min(w, int(round(x2 + mx))), min(h, int(round(y2 + my)))
    if cx2 <= cx1 or cy2 <= cy1:  # box outside the image (e.g. the wrong file): show the whole image
        cx1, cy1, cx2, cy2 = 0, 0, w, h
    crop = image.crop((cx1, cy1, cx2, cy2))
    if outline:
        crop = crop.copy()
        lw = max(1, round(max(crop.size) / 150))
        ImageDraw.Draw(crop).rectangle([x1 - cx1, y1 - cy1, x2 - cx1 - 1, y2 - cy1 - 1], outline=(255, 0, 0), width=lw)
    scale = thumb / max(crop.size)
    if scale < 1 or max(crop.size) < thumb // 2:  # tiny regions are enlarged to half a thumbnail, to be seen
        scale = min(scale, thumb / 2 / max(crop.size)) if scale > 1 else scale
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
    return crop


def hit_crop(hit: Hit, image_root: Optional[PathLike] = None, **kwargs: Any) -> Optional[Any]:
    """The PIL crop of a hit, or None when its image cannot be found."""
    path = resolve_image(hit, image_root)
    if path is None:
        return None
    return crop_region(_open_rgb(str(path)), hit.box, **kwargs)


def _data_uri(im: Any, quality: int = 85) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
h1{font-size:18px;margin:0 0 4px} .meta{color:#555;font-size:13px;margin-bottom:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}
.card{background:#fff;border-radius:6px;padding:8px;box-shadow:0 1px 3px rgba(0,0,0,.15);font-size:12px}
.card img{display:block;margin:0 auto 6px;max-width:224px;max-height:224px}
.card .missing{height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#a00}
.rank{font-weight:bold} .score{float:right;font-family:monospace} .name,.box{word-break:break-all;color:#444}
"""


def contact_sheet(hits: Sequence[Hit], out: PathLike, *, title: str = "regionclip search",
                  image_root: Optional[PathLike] = None, thumb: int = 224) -> Path:
    """Write an HTML page with one card per hit (crop, rank, cosine score, image name, box); returns its path.

    Images that cannot be found get a card saying so (the page still shows all hits). Written atomically."""
    cards = []
    for h in hits:
        crop = hit_crop(h, image_root, thumb=thumb)
        box = ", ".join(f"{v:.1f}" for v in h.box)
        extra = []
        if h.class_name is not None:
            extra.append(f"class {html.escape(h.class_name)}")
        if h.det_score is not None:
            extra.append(f"det {h.det_score:.3f}")
        if h.objectness is not None:
            extra.append(f"obj {h.objectness:.2f}")
        pic = (f'<img src="{_data_uri(crop)}" alt="rank {h.rank}: {html.escape(h.file_name)}">' if crop is not None
               else f'<div class="missing">image not found:<br>{html.escape(h.file_name)}</div>')
        cards.append(
            f'<div class="card" data-rank="{h.rank}" data-key="{html.escape(h.key, quote=True)}" '
            f'data-box="{box}" data-score="{h.score:.6f}">{pic}'
            f'<div><span class="rank">#{h.rank}</span><span class="score">{h.score:.4f}</span></div>'
            f'<div class="name">{html.escape(h.file_name)}</div><div class="box">[{box}]</div>'
            + (f'<div class="extra">{" · ".join(extra)}</div>' if extra else "") + "</div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='meta'>{len(hits)} regions, cosine similarity, best first</div>"
            f"<div class='grid' id='results'>{''.join(cards)}</div></body></html>")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
