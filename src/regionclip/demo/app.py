"""The web demo: upload or pick an image, give a vocabulary, detect with RPN proposals or classify your own boxes.

Design:

* :class:`DemoBackend` holds the one loaded :class:`~regionclip.api.RegionCLIP`, an in-memory LRU cache of class
  embeddings keyed by the vocabulary, and a lock. Each request passes its own class embeddings / post-processing
  to ``detect`` (nothing per-request is stored on the model), and the whole embed + detect call runs under the
  lock, so concurrent requests can never see each other's vocabulary. It does not import gradio.
* :func:`build_demo` wraps a backend in a ``gr.Blocks`` page with a queue (``default_concurrency_limit=1``):
  extra requests wait in the queue instead of piling threads onto a CPU-bound model.
* User mistakes (no image, empty vocabulary, malformed boxes, RPN mode without an RPN) raise
  :class:`DemoInputError`, shown in the page as a ``gr.Error``; unexpected failures are logged with their
  traceback on the server and shown as one line, so the page never shows a stack trace and the app stays up.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from ..api import RegionCLIP
from ..assets import demo_image_paths
from ..evaluation.visualize import draw_detections
from ..formats import BadBoxesError, detections_to_coco
from ..search import RegionIndex
from ..search.demo_tab import build_search_tab
from ..structures import Detections
from ..text.vocabulary import Vocabulary, resolve_names
from ..utils import require, write_json_atomic

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[str]], Tensor]

VOCAB_CUSTOM, VOCAB_COCO, VOCAB_LVIS = "Custom (comma-separated)", "COCO-65", "LVIS-1203"
VOCAB_CHOICES = (VOCAB_CUSTOM, VOCAB_COCO, VOCAB_LVIS)
REGIONS_RPN, REGIONS_BOXES = "RPN proposals", "My boxes (drawn or typed)"
REGION_CHOICES = (REGIONS_RPN, REGIONS_BOXES)
DEFAULT_VOCAB = "potted plant, sink, bottle, blender, dish rack, frying pan, knife, cutting board, hand"
TABLE_HEADERS = ["class", "score", "x1", "y1", "x2", "y2"]
# Gradio's default theme pulls fonts from a web font service; the demo must work offline, so use system fonts.
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


class DemoInputError(ValueError):
    """A problem with what the user entered; its message is shown in the page as is."""


@dataclass
class DemoResult:
    """What one request returns to the page."""

    annotated: Image.Image
    rows: list[list[Any]]  # one per detection, columns = TABLE_HEADERS
    json_path: Path
    status: str  # markdown summary
    detections: Detections


# ---------------------------------------------------------------------------------------------- input parsing
def resolve_vocabulary(choice: str, text: str) -> tuple[list[str], list[int], str]:
    """(names, category ids, label) of the vocabulary picked in the page.

    Built-ins use their dataset category ids (COCO / LVIS ids, as ``regionclip detect``); a custom list uses
    index + 1. Custom names are split on commas or new lines, stripped, and de-duplicated keeping the first
    occurrence (a repeated name would only split its score between two identical classes).
    """
    if choice == VOCAB_COCO:
        return (*resolve_names("coco65"), "COCO-65")
    if choice == VOCAB_LVIS:
        return (*resolve_names("lvis1203"), "LVIS-1203")
    if choice != VOCAB_CUSTOM:
        raise DemoInputError(f"unknown vocabulary choice {choice!r}; pick one of {', '.join(VOCAB_CHOICES)}")
    names = list(OrderedDict.fromkeys(n.strip() for n in re.split(r"[,\n]", text or "") if n.strip()))
    if not names:
        raise DemoInputError("The vocabulary is empty: type class names separated by commas (e.g. "
                             "'car, traffic cone, dog') or choose COCO-65 / LVIS-1203.")
    return names, list(range(1, len(names) + 1)), f"{len(names)} custom classes"


def parse_typed_boxes(text: str, width: int, height: int) -> list[list[float]]:
    """Boxes typed as ``x1,y1,x2,y2`` (original pixels), one per line or separated by ``;``.

    Boxes are clipped to the image; a box with the wrong number of values, non-numbers, or no area inside the
    image is an error naming the box (silently dropping it would classify fewer boxes than the user asked for).
    """
    boxes: list[list[float]] = []
    for i, part in enumerate(p.strip() for p in re.split(r"[;\n]", text or "")):
        if not part:
            continue
        values = [v for v in re.split(r"[,\s]+", part.strip("[]() ")) if v]
        try:
            x1, y1, x2, y2 = (float(v) for v in values)
        except ValueError:
            raise DemoInputError(f"Box {i + 1} ({part!r}) is not 4 numbers x1,y1,x2,y2 (pixels of the original "
                                 "image, top-left to bottom-right).") from None
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 - cx1 < 1 or cy2 - cy1 < 1:
            raise DemoInputError(f"Box {i + 1} ({part!r}) has no area inside the {width}x{height} image; give "
                                 "x1 < x2 and y1 < y2 in pixels.")
        boxes.append([cx1, cy1, cx2, cy2])
    return boxes


def boxes_from_strokes(layers: Sequence[Any], width: int, height: int, *, grid: int = 256,
                       min_size_px: float = 4.0) -> list[list[float]]:
    """One box per connected brush stroke drawn on the image editor's layers (XYXY, original pixels).

    A stroke drawn around an object (or a scribble over it) gives that object's box. Components are found on a
    copy downsampled to at most ``grid`` px per side (fast in pure Python; joins strokes closer than a cell),
    then scaled back to the image size, so layers of a different canvas size than the image also map correctly.
    """
    mask_total: Optional[np.ndarray] = None
    for layer in layers or []:
        if layer is None:
            continue
        arr = np.asarray(layer.convert("RGBA") if isinstance(layer, Image.Image) else layer)
        if arr.ndim != 3:
            continue
        drawn = arr[..., 3] > 0 if arr.shape[2] == 4 else arr.max(axis=2) > 0
        mask_total = drawn if mask_total is None else (mask_total | _resize_mask(drawn, mask_total.shape))
    if mask_total is None or not mask_total.any():
        return []
    lh, lw = mask_total.shape
    step = max(1, int(np.ceil(max(lh, lw) / grid)))
    gh, gw = -(-lh // step), -(-lw // step)
    padded = np.zeros((gh * step, gw * step), dtype=bool)
    padded[:lh, :lw] = mask_total
    small = np.asarray(padded.reshape(gh, step, gw, step).any(axis=(1, 3)))  # [gh, gw] (.any is typed bool | array)
    seen = np.zeros_like(small)
    sx, sy = width / lw, height / lh
    boxes = []
    for y0, x0 in zip(*np.nonzero(small)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [y0], [x0]
        while queue:  # 8-connected flood fill
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < gh and 0 <= nx < gw and small[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
                        ys.append(ny)
                        xs.append(nx)
        x1, y1 = min(xs) * step * sx, min(ys) * step * sy
        x2, y2 = min((max(xs) + 1) * step, lw) * sx, min((max(ys) + 1) * step, lh) * sy
        if x2 - x1 >= min_size_px and y2 - y1 >= min_size_px:
            boxes.append([float(x1), float(y1), float(min(x2, width)), float(min(y2, height))])
    return boxes


def _resize_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(im) > 0


def editor_image_and_layers(value: Any) -> tuple[Optional[Image.Image], list[Any]]:
    """(background image, drawn layers) of an ``ImageEditor`` value; plain images / paths are accepted too."""
    if value is None:
        return None, []
    if isinstance(value, dict):
        bg = value.get("background")
        if bg is None:
            bg = value.get("composite")
        layers = list(value.get("layers") or [])
    else:
        bg, layers = value, []
    if bg is None:
        return None, layers
    try:
        if isinstance(bg, (str, os.PathLike)):
            with Image.open(bg) as im:
                img = im.convert("RGB")
        elif isinstance(bg, Image.Image):
            img = bg.convert("RGB")
        else:
            arr = np.asarray(bg)
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure is the user's file, reported as such
        raise DemoInputError(f"Could not read the image ({type(e).__name__}: {e}); upload a JPEG or PNG.") from None
    return img, layers


# ---------------------------------------------------------------------------------------------- backend
class DemoBackend:
    """The model, the vocabulary-embedding cache and the lock that serialises model calls.

    Args:
        model: a loaded :class:`RegionCLIP` (loaded once, shared by all requests).
        embed_fn: names -> [K, D] class embeddings. Default: the checkpoint's own text encoder with the 81
            prompt templates (:func:`regionclip.text.name_cache.class_embeddings`, also cached on disk).
        cache_size: how many vocabularies keep their embeddings in memory (LRU).
        output_dir: where the per-request results JSON files go (default: a temp folder removed at exit).
        cache_dir: disk cache of the default ``embed_fn``.
    """

    def __init__(self, model: RegionCLIP, embed_fn: Optional[EmbedFn] = None, *, cache_size: int = 8,
                 output_dir: Optional[Path] = None, cache_dir: Optional[Path] = None) -> None:
        if embed_fn is None:
            if model.weights_path is None:
                raise ValueError("the model was not loaded from a checkpoint, so it has no text encoder to embed "
                                 "vocabularies with: pass embed_fn (names -> [K, D] tensor)")

            def embed_fn(names: Sequence[str]) -> Tensor:
                return model.embed_names(names, cache_dir=cache_dir)

        self.model = model
        self.embed_fn = embed_fn
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[tuple[str, ...], Vocabulary] = OrderedDict()
        # one lock for embedding + detection: torch on CPU already uses every core, so running requests one at a
        # time loses nothing, and it guarantees no request ever observes another's vocabulary or settings
        self._lock = threading.Lock()
        if output_dir is None:
            output_dir = Path(tempfile.mkdtemp(prefix="regionclip-demo-"))
            atexit.register(shutil.rmtree, output_dir, True)
        self.output_dir = Path(output_dir)
        self.embed_calls = 0  # how many times embed_fn ran (cache misses); shown in tests and the status line

    @property
    def has_rpn(self) -> bool:
        return self.model.detector.rpn is not None

    def vocabulary(self, names: Sequence[str], category_ids: Sequence[int]) -> Vocabulary:
        """The validated vocabulary of ``names``, from the in-memory cache when it was seen before.

        Call with the lock held (as :meth:`run` does)."""
        key = tuple(names)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        emb = self.embed_fn(list(names))
        if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != len(names):
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise RuntimeError(f"embed_fn returned {shape} for {len(names)} names; expected a [K, D] tensor")
        self.embed_calls += 1
        vocab = Vocabulary.create(emb, names, category_ids, embed_dim=self.model.detector.embed_dim,
                                  source="demo vocabulary")
        self._cache[key] = vocab
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vocab

    def run(self, image: Image.Image, vocab_choice: str, vocab_text: str, region_source: str,
            boxes: Optional[list[list[float]]], score_thresh: float, max_boxes: int) -> DemoResult:
        """One request: embed the vocabulary (cached), detect, draw, tabulate, write the results JSON."""
        names, cat_ids, vocab_label = resolve_vocabulary(vocab_choice, vocab_text)
        if region_source == REGIONS_RPN:
            if not self.has_rpn:
                raise DemoInputError("This model has no region proposal network (start the demo with "
                                     "--rpn-weights, or use a checkpoint with an offline RPN). Choose 'My boxes' "
                                     "and draw or type boxes instead.")
            user_boxes = None
        elif region_source == REGIONS_BOXES:
            if not boxes:
                raise DemoInputError("No boxes: draw around objects with the brush on the image, or type boxes "
                                     "as x1,y1,x2,y2 (one per line), or choose 'RPN proposals'.")
            user_boxes = [boxes]
        else:
            raise DemoInputError(f"unknown region source {region_source!r}")
        # detections come in the upright frame (the decoder applies EXIF orientation): draw in that frame too
        image = ImageOps.exif_transpose(image)
        if min(image.size) < 8:
            raise DemoInputError(f"The image is {image.width}x{image.height} pixels; it needs at least 8 per side.")
        t0 = time.perf_counter()
        with self._lock:
            misses = self.embed_calls
            vocab = self.vocabulary(names, cat_ids)
            cached = self.embed_calls == misses
            try:
                det = self.model.detect([image], user_boxes, vocabulary=vocab, score_thresh=float(score_thresh),
                                        detections_per_image=max(1, int(max_boxes)))[0]
            except BadBoxesError as e:
                raise DemoInputError(str(e)) from None
        dt = time.perf_counter() - t0
        annotated = draw(image, det)
        rows = [[name, round(float(s), 4), *[round(float(v), 1) for v in box]]
                for name, s, box in zip(det.names, det.scores.tolist(), det.boxes.tolist())]
        json_path = self._write_json(det, names, cat_ids, image, region_source)
        n_boxes = len(boxes or [])
        regions = "RPN proposals" if user_boxes is None else f"{n_boxes} user box{'es' if n_boxes != 1 else ''}"
        status = (f"**{len(det)} detection{'s' if len(det) != 1 else ''}** from {regions}, vocabulary: "
                  f"{vocab_label} (embeddings {'cached' if cached else 'computed'}), score > {score_thresh:g}, "
                  f"at most {int(max_boxes)} boxes; {dt:.2f} s.")
        return DemoResult(annotated, rows, json_path, status, det)

    def _write_json(self, det: Detections, names: list[str], cat_ids: list[int], image: Image.Image,
                    region_source: str) -> Path:
        """COCO-style results (as ``regionclip detect``) plus the class name and XYXY box of each detection."""
        anns = detections_to_coco(det, 1, cat_ids)
        for a, name, box in zip(anns, det.names, det.boxes.tolist()):
            a["category_name"] = name
            a["bbox_xyxy"] = box
        payload = {"image": {"id": 1, "width": image.width, "height": image.height},
                   "region_source": region_source,
                   "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names)],
                   "annotations": anns}
        # a folder per request keeps the friendly download name without clashes between concurrent requests
        return write_json_atomic(payload, self.output_dir / uuid.uuid4().hex / "regionclip_results.json", indent=1)


def draw(image: Image.Image, det: Detections) -> Image.Image:
    """The annotated image (boxes already thresholded by post-processing, so everything is drawn)."""
    return draw_detections(image, det, conf_threshold=float("-inf"))


# ---------------------------------------------------------------------------------------------- gradio page
def _gradio() -> Any:
    # analytics would try to reach the internet on import/launch; the demo must work offline
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    return require("gradio", "demo", "the web demo")


def build_demo(model: RegionCLIP, embed_fn: Optional[EmbedFn] = None, *, title: str = "RegionCLIP demo",
               max_queue: int = 64, backend: Optional[DemoBackend] = None, search_index: Optional[RegionIndex] = None,
               image_root: Optional[Path] = None, **backend_kwargs: Any) -> Any:
    """A ``gr.Blocks`` app around an already loaded model (queue configured; call :func:`launch_demo`).

    ``embed_fn`` (names -> [K, D]) replaces the text encoder, e.g. random embeddings in tests. The backend is
    reachable as ``demo.regionclip_backend``; the detect endpoint is ``api_name="detect"``. ``search_index``: a
    :class:`regionclip.search.RegionIndex` adds a "Search" tab (text queries over the indexed regions).
    """
    gr = _gradio()
    be = backend or DemoBackend(model, embed_fn, **backend_kwargs)

    def on_detect(editor: Any, vocab_choice: str, vocab_text: str, region_source: str, typed_boxes: str,
                  score_thresh: float, max_boxes: float) -> tuple[Image.Image, list[list[Any]], str, str]:
        try:
            image, layers = editor_image_and_layers(editor)
            if image is None:
                raise DemoInputError("No image: upload one or pick an example below.")
            boxes = None
            if region_source == REGIONS_BOXES:
                boxes = parse_typed_boxes(typed_boxes, image.width, image.height) + \
                    boxes_from_strokes(layers, image.width, image.height)
            res = be.run(image, vocab_choice, vocab_text, region_source, boxes, score_thresh, int(max_boxes))
        except DemoInputError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - keep the app alive; full traceback goes to the server log only
            log.exception("demo request failed")
            raise gr.Error(f"Detection failed: {type(e).__name__}: {e} (details in the server log)") from None
        return res.annotated, res.rows, str(res.json_path), res.status

    examples = [str(p) for p in demo_image_paths()]
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        if search_index is None:
            _detect_tab(gr, be, examples, title, on_detect)
        else:
            with gr.Tab("Detect"):
                _detect_tab(gr, be, examples, title, on_detect)
            with gr.Tab("Search"):
                build_search_tab(search_index, lambda names: be.model.embed_names(names), image_root=image_root)
    # one model call at a time; further requests wait in the queue (up to max_queue) instead of failing
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    demo.regionclip_backend = be
    return demo


def _detect_tab(gr: Any, be: DemoBackend, examples: list[str], title: str, on_detect: Callable[..., Any]) -> None:
    """The detection UI (upload, vocabulary, regions, results) in the current gradio context."""
    if True:  # keeps the layout code at the indentation it had inside gr.Blocks
        gr.Markdown(f"# {title}\nOpen-vocabulary detection with region-level CLIP features. Upload an image or "
                    "pick an example, type the classes to look for, and press **Detect**. To classify your own "
                    "regions, choose *My boxes* and draw around objects with the brush or type boxes.")
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(label="Image (draw around objects to give your own boxes)", type="pil",
                                        sources=["upload", "clipboard"], transforms=(), layers=False,
                                        brush=gr.Brush(colors=["#ff3b30"], default_size=6, color_mode="fixed"),
                                        elem_id="rc-image")
                gr.Examples(examples=[[p] for p in examples], inputs=[editor], label="Example images")
                vocab_choice = gr.Radio(list(VOCAB_CHOICES), value=VOCAB_CUSTOM, label="Vocabulary",
                                        elem_id="rc-vocab-choice")
                vocab_text = gr.Textbox(value=DEFAULT_VOCAB, label="Class names (comma-separated)", lines=2,
                                        elem_id="rc-vocab")
                region_source = gr.Radio(list(REGION_CHOICES), value=REGIONS_RPN if be.has_rpn else REGIONS_BOXES,
                                         label="Regions", elem_id="rc-regions",
                                         info=None if be.has_rpn else "no RPN loaded: give boxes (--rpn-weights "
                                         "enables proposals)")
                typed_boxes = gr.Textbox(label="Boxes x1,y1,x2,y2 (original pixels, one per line)", lines=2,
                                         placeholder="100, 80, 420, 360", elem_id="rc-boxes")
                with gr.Row():
                    score = gr.Slider(0.0, 1.0, value=0.05, step=0.01, label="Score threshold", elem_id="rc-score")
                    max_boxes = gr.Slider(1, 100, value=25, step=1, label="Max boxes", elem_id="rc-max")
                run_btn = gr.Button("Detect", variant="primary", elem_id="rc-run")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="rc-status")
                annotated = gr.Image(label="Detections", type="pil", interactive=False, elem_id="rc-annotated")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Detections table", interactive=False,
                                     elem_id="rc-table")
                json_file = gr.File(label="Results JSON", interactive=False, elem_id="rc-json")
        run_btn.click(on_detect, [editor, vocab_choice, vocab_text, region_source, typed_boxes, score, max_boxes],
                      [annotated, table, json_file, status], api_name="detect")


def launch_demo(demo: Any, *, host: str = "127.0.0.1", port: Optional[int] = 7860, block: bool = True,
                quiet: bool = False) -> str:
    """Serve ``demo`` (offline: no share link, no server-side rendering, system fonts). Returns the local URL;
    with ``block=False`` returns right away and the server runs in a background thread (tests)."""
    gr = _gradio()
    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, theme=theme,
                            prevent_thread_lock=True, quiet=quiet, show_error=False,
                            allowed_paths=[str(p.parent) for p in demo_image_paths()[:1]])
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


__all__ = ["DemoBackend", "DemoInputError", "DemoResult", "boxes_from_strokes", "build_demo", "draw",
           "editor_image_and_layers", "launch_demo", "parse_typed_boxes", "resolve_vocabulary"]
