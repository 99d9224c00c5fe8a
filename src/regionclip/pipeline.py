"""The one inference pipeline: decode -> resize -> regions -> encode -> classify -> post-process -> rescale.

Every front end (the :class:`~regionclip.api.RegionCLIP` API, the SAM-style predictor, ``extract-regions``,
``evaluate``, evaluation during training, the web demo) runs images through :class:`Pipeline`; none of them
assembles the stages itself (docs/DESIGN.md#pipeline). Per-call settings are explicit arguments bundled in a
frozen :class:`RunOptions` (dtype, chunk size, batch size, post-processing, ...); the model underneath is pure
(tensors in, tensors out) and never changes between calls.

Stages, in order (each a method, usable on its own):

1. :meth:`Pipeline.prepare` - decode (EXIF, every Pillow mode) + the original's test-time resize.
2. regions - :meth:`Pipeline.proposals` (offline RPN, float32) or :meth:`Pipeline.user_regions` (user / GT
   boxes, validated and scaled exactly like the original's dataset mapper).
3. :meth:`Pipeline.features` - res4 (or the transformer map) of a padded batch.
4. :meth:`Pipeline.encode` - RoIAlign -> res5 -> attnpool, chunked, optional autocast.
5. :meth:`Pipeline.detect_prepared` - classify, RPN-score multiplication, box regression, per-image selection,
   rescale to the original image, masks.

:meth:`Pipeline.run` streams many images (decoding in DataLoader workers, batching, per-image errors).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

from .config import InputConfig, PostprocessConfig
from .data.images import DEFAULT_MAX_PIXELS, ImageInput
from .data.loader import IncompleteRunError, InferenceItem, batch_by_size, iter_loaded, make_loader, prepare_image
from .formats.box_files import BadBoxesError, validate_user_boxes
from .inference.hardware import default_chunk_size
from .inference.postprocess import (
    combine_rpn_scores,
    postprocess_detections,
    reachable_by_rpn_score,
    rescale_to_original,
)
from .inference.precision import refine_in_float32
from .modeling.heads import paste_masks
from .modeling.recognizer import RegionRecognizer
from .ops.boxes import clip_boxes, scale_boxes_like_d2
from .structures import Detections, PreparedImage, Proposals
from .text.vocabulary import Vocabulary
from .utils import COMPUTE_DTYPES, autocast_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Per-call inference settings (all explicit; nothing is stored on the model).

    postprocess: thresholds, NMS, RPN-score multiplication, box deltas (:class:`PostprocessConfig`).
    dtype: compute dtype of the backbone and region head (autocast); the RPN and the classifier stay float32.
    chunk_size: regions per region-head call; bounds memory, never changes a result. None: the measured best for
        the device (:func:`regionclip.inference.hardware.default_chunk_size`).
    batch_size: images per backbone pass (:meth:`Pipeline.run` / :meth:`Pipeline.detect`).
    max_proposals: keep only the k best RPN proposals per image (None = all the RPN returns).
    skip_unreachable: with raw-logit multiplication, do not encode proposals whose score can never pass the
        threshold (``sqrt(p * logit) <= sqrt(logit) <= thresh``); exact, detection only.
    keep_probs / keep_features: store each detection's [K(+1)] probabilities / raw [D] source-region embedding.
    num_workers: decoding processes for :meth:`Pipeline.run` (0 = in this process).
    pad_mixed_sizes: batch images of different sizes with zero padding (as the original's batched evaluation;
        changes features near the padded border), default: only equal sizes share a batch.
    max_pixels: refuse images with more decoded pixels than this (None: no limit); docs/DESIGN.md#image-inputs.
    refine_float32: with a 16-bit dtype, encode again in float32 the regions whose float32 result could change
        the detections (:mod:`regionclip.inference.precision`); False = the plain 16-bit result (faster, less agreement).
    """

    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    dtype: str = "float32"
    chunk_size: Optional[int] = None
    batch_size: int = 1
    max_proposals: Optional[int] = None
    skip_unreachable: bool = True
    keep_probs: bool = False
    keep_features: bool = False
    num_workers: int = 0
    pad_mixed_sizes: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    refine_float32: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        for name in ("chunk_size", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_proposals is not None and self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @classmethod
    def create(cls, postprocess: Optional[PostprocessConfig] = None, **overrides: Any) -> "RunOptions":
        """Options from a base post-processing config (a model's default per-call post-processing,
        ``Settings.postprocess``) and overrides named by field: any :class:`RunOptions` field (``batch_size``,
        ``dtype``, ``chunk_size``, ...) or :class:`PostprocessConfig` field (``score_thresh``, ``nms_thresh``, ...).
        Every default is this class's (defined once, here); an unknown name is an error naming the accepted ones."""
        return cls(postprocess=postprocess or PostprocessConfig()).override(**overrides)

    def override(self, **overrides: Any) -> "RunOptions":
        """A copy with fields replaced by name, run and post-processing fields in one namespace (the one way to
        change per-call settings: :meth:`create`, ``RegionCLIP.run_options``, the predictor)."""
        run_names = {f.name for f in fields(self)} - {"postprocess"}
        post_names = {f.name for f in fields(PostprocessConfig)}
        unknown = sorted(set(overrides) - run_names - post_names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}: per-call options are RunOptions fields "
                            f"{sorted(run_names)} or post-processing fields {sorted(post_names)}")
        post = replace(self.postprocess, **{k: v for k, v in overrides.items() if k in post_names})
        return replace(self, postprocess=post, **{k: v for k, v in overrides.items() if k in run_names})


@dataclass
class ItemError:
    """An input that produced no output, and why (unreadable, too large, bad boxes)."""

    item: InferenceItem
    error: str


@dataclass
class ItemBatch:
    """Decoded images that run through the model together (``regions``: user boxes, resized frame)."""

    items: list[InferenceItem]
    prepared: list[PreparedImage]
    regions: Optional[list[Proposals]] = None

    def single(self, j: int) -> "ItemBatch":
        """The batch of image ``j`` alone."""
        return ItemBatch([self.items[j]], [self.prepared[j]], None if self.regions is None else [self.regions[j]])


R = TypeVar("R")


def run_batch(batch: ItemBatch, fn: Callable[[ItemBatch], Sequence[R]]) -> list[Union[R, ItemError]]:
    """``fn(batch)`` (one result per image), with model failures pinned to images.

    When ``fn`` raises on a batch of several images, each image is run alone, so the others still get their
    results and only the image that fails becomes an :class:`ItemError` naming it and the exception. Caught are
    the failures that depend on the image: RuntimeError (torch's shape errors, e.g. an image so elongated that a
    feature map has no pixels left, and out-of-memory), MemoryError, and StopIteration (which would otherwise end
    the caller's loop as if the data had run out). Settings errors (ValueError; RPN mode without an RPN is
    refused before a run starts), bugs (TypeError ...) and KeyboardInterrupt stop the run as before.
    """
    try:
        out: list[Union[R, ItemError]] = list(fn(batch))
    except (RuntimeError, MemoryError, StopIteration) as e:
        if len(batch.items) > 1:
            return [r for j in range(len(batch.items)) for r in run_batch(batch.single(j), fn)]
        it = batch.items[0]
        logger.debug("model failure on %s", it.file_name, exc_info=True)
        return [ItemError(it, f"{it.file_name}: {type(e).__name__} while running the model on it"
                              f"{f' ({e})' if str(e) else ''}")]
    if len(out) != len(batch.items):
        raise IncompleteRunError(f"got {len(out)} results for a batch of {len(batch.items)} images "
                                 f"({', '.join(it.file_name for it in batch.items)}); a bug in regionclip")
    return out


@dataclass
class ImageResult:
    """One input's outcome in :meth:`Pipeline.run`: detections, or the error that skipped it."""

    item: InferenceItem
    detections: Optional[Detections] = None
    error: Optional[str] = None


def top_proposals(proposals: Sequence[Proposals], k: Optional[int]) -> list[Proposals]:
    """First ``k`` proposals per image (the RPN returns them by descending objectness)."""
    if k is None:
        return list(proposals)
    return [Proposals(p.boxes[:k], None if p.objectness_logits is None else p.objectness_logits[:k])
            for p in proposals]


class Pipeline:
    """Runs images through a :class:`~regionclip.modeling.recognizer.RegionRecognizer`.

    Args:
        model: the pure detector (CLIP-ResNet or transformer).
        input_cfg: the test-time resize (shortest edge / longest edge) the model was trained with.
    """

    def __init__(self, model: RegionRecognizer, input_cfg: InputConfig = InputConfig()) -> None:
        self.model = model
        self.input_cfg = input_cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ 1. decode + resize
    def prepare(self, image: ImageInput, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> PreparedImage:
        """Decode (paths, PIL, arrays, uint8 tensors) + resize (docs/DESIGN.md#preprocessing)."""
        return prepare_image(image, self.input_cfg, max_pixels=max_pixels)

    # ------------------------------------------------------------------ 2. regions
    def user_regions(self, boxes: Any, prepared: PreparedImage, *, frame: str = "original", image_name: str = "",
                     source: str = "") -> Proposals:
        """User/GT boxes (XYXY) -> resized-frame regions (validated, scaled, clipped; no objectness).

        ``frame="resized"`` if the boxes are already in the resized frame. Scaling follows the original's dataset
        mapper exactly (docs/DESIGN.md#box-scaling): float64 products, and *integer* boxes (a JSON with whole
        numbers, an int array) are truncated toward zero after scaling.

        Raises:
            BadBoxesError: naming the image, the first bad box and the boxes file (``source``).
        """
        hw = prepared.original_hw if frame == "original" else prepared.resized_hw
        raw = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, Tensor) else boxes)
        raw = raw.float().reshape(0, 4) if raw.numel() == 0 else raw
        validate_user_boxes(raw, hw, source=source, image_name=image_name)
        b = raw.reshape(-1, 4).float()
        if frame == "original":
            b = scale_boxes_like_d2(raw.reshape(-1, 4), *prepared.scale_xy, truncate=not raw.is_floating_point())
        return Proposals(clip_boxes(b, *prepared.resized_hw), None)

    @torch.no_grad()
    def proposals(self, prepared: Sequence[PreparedImage], options: RunOptions = RunOptions()) -> list[Proposals]:
        """Offline-RPN proposals (float32: proposal boxes must stay exact), the best ``max_proposals`` per image."""
        return top_proposals(self.model.propose([p.image for p in prepared]), options.max_proposals)

    # ------------------------------------------------------------------ 3-4. features and region embeddings
    def chunk_size(self, options: RunOptions) -> int:
        """Regions per region-head call: the option, or the measured best for this model's device."""
        return options.chunk_size or default_chunk_size(self.device)

    @torch.no_grad()
    def features(self, prepared: Sequence[PreparedImage], options: RunOptions = RunOptions()) -> Tensor:
        with autocast_context(self.device, options.dtype):
            return self.model.compute_features([p.image for p in prepared])

    @torch.no_grad()
    def encode(self, features: Tensor, boxes: Sequence[Tensor], options: RunOptions = RunOptions()) -> Tensor:
        """[sum R_i, D] raw float32 region embeddings of per-image resized-frame boxes, in input order."""
        with autocast_context(self.device, options.dtype):
            emb, _ = self.model.encode_regions(features, boxes, chunk_size=self.chunk_size(options))
        return emb.float()

    def classify(self, region_emb: Tensor, vocabulary: Vocabulary) -> Tensor:
        """[R, D] -> [R, K(+1)] probabilities (background last when the model has one)."""
        return self.model.classify(region_emb, vocabulary.class_embeddings.to(region_emb.device))

    # ------------------------------------------------------------------ 5. detection
    @torch.no_grad()
    def detect_prepared(self, prepared: Sequence[PreparedImage], vocabulary: Vocabulary,
                        options: RunOptions = RunOptions(), *, regions: Optional[Sequence[Proposals]] = None,
                        features: Optional[Tensor] = None) -> list[Detections]:
        """Detect on prepared images.

        ``regions`` (resized frame): None runs the RPN; regions without objectness are user/GT boxes (GT mode: no
        RPN-score multiplication, no box deltas); regions *with* objectness are precomputed RPN proposals.
        ``features``: a cached res4 map of exactly these images (the predictor's).
        """
        cfg = options.postprocess
        gt_mode = regions is not None and all(r.objectness_logits is None for r in regions)
        if regions is None:
            regions = self.proposals(prepared, options)
        elif not gt_mode:
            regions = top_proposals(regions, options.max_proposals)
        if gt_mode and cfg.rpn_score != "none":
            cfg = replace(cfg, rpn_score="none")  # no objectness for given boxes (the original can't do it either)
        # exact work skipping (docs/DESIGN.md#work-skipping): regions whose score cannot pass the threshold
        kept = [torch.arange(len(r.boxes), device=r.boxes.device) if not (
                    options.skip_unreachable and cfg.rpn_score == "raw" and r.objectness_logits is not None)
                else reachable_by_rpn_score(r.objectness_logits, cfg.score_thresh).nonzero().flatten()
                for r in regions]
        if features is None:
            features = self.features(prepared, options)
        emb = self.encode(features, [r.boxes[k] for r, k in zip(regions, kept)], options)
        probs_all = self.classify(emb, vocabulary)
        if options.dtype != "float32" and options.refine_float32:  # trusted 16-bit path (docs/DESIGN.md#cpu-speed)
            emb, probs_all, _ = refine_in_float32(
                self.model, features, [r.boxes[k] for r, k in zip(regions, kept)],
                [None if gt_mode or r.objectness_logits is None else r.objectness_logits[k]
                 for r, k in zip(regions, kept)], emb, probs_all, vocabulary.class_embeddings.to(emb.device), cfg,
                [p.resized_hw for p in prepared], self.chunk_size(options))
        has_bg = bool(self.model.has_background)
        results, start = [], 0
        for img_i, (p, r, k) in enumerate(zip(prepared, regions, kept)):
            n = int(k.numel())
            e, probs = emb[start:start + n], probs_all[start:start + n]
            start += n
            logits = None if r.objectness_logits is None else r.objectness_logits[k]
            scores = combine_rpn_scores(probs, logits, cfg.rpn_score)
            boxes = r.boxes[k].to(e.device)
            if cfg.apply_box_deltas and not gt_mode:
                boxes = self.model.predict_boxes(e, boxes)
            dets = postprocess_detections(boxes, scores, p.resized_hw, cfg, probs=probs, has_background=has_bg)
            out = rescale_to_original(dets, p.resized_hw, p.original_hw)
            masks = None
            if self.model.mask_head is not None:
                with autocast_context(self.device, options.dtype):  # res4 is 16-bit under a 16-bit dtype
                    logits_m = self.model.predict_masks(features[img_i:img_i + 1], [dets["boxes"][out["keep"]]],
                                                        chunk_size=self.chunk_size(options))[0]
                masks = paste_masks(logits_m.float(), out["boxes"], *p.original_hw)
            rows = out["region_index"]
            results.append(Detections(
                boxes=out["boxes"], scores=out["scores"], labels=out["labels"], image_size=p.original_hw,
                class_names=list(vocabulary.names), region_index=k.to(rows.device)[rows],
                probs=probs[rows] if options.keep_probs else None, masks=masks,
                features=e[rows] if options.keep_features else None))
        return results

    def detect(self, images: Sequence[ImageInput], vocabulary: Vocabulary, options: RunOptions = RunOptions(), *,
               boxes: Optional[Sequence[Any]] = None) -> list[Detections]:
        """Detect on in-memory images or paths, ``options.batch_size`` at a time; the first bad input raises.

        ``boxes``: per-image user boxes (XYXY, original pixels) -> GT/box-prompt mode.
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
        out: list[Detections] = []
        for s in range(0, len(images), options.batch_size):
            prepared = [self.prepare(im, max_pixels=options.max_pixels) for im in images[s:s + options.batch_size]]
            regions = None
            if boxes is not None:
                regions = [self.user_regions(b, p, image_name=_name(images[s + j], s + j))
                           for j, (b, p) in enumerate(zip(boxes[s:s + options.batch_size], prepared))]
            try:
                out += self.detect_prepared(prepared, vocabulary, options, regions=regions)
            except StopIteration as e:  # would end a caller's loop over our result as if it were empty
                names = ", ".join(_name(images[s + j], s + j) for j in range(len(prepared)))
                raise RuntimeError(f"StopIteration while running the model on {names}") from e
        if len(out) != len(images):
            raise IncompleteRunError(f"{len(out)} results for {len(images)} images (a bug in regionclip)")
        return out

    # ------------------------------------------------------------------ streaming over many inputs
    def iter_batches(self, items: Sequence[InferenceItem], options: RunOptions = RunOptions(), *,
                     boxes_source: str = "") -> Iterator[Union[ItemBatch, ItemError]]:
        """Decode ``items`` in DataLoader workers and group them into model batches; an unreadable image, one over
        the pixel limit or one with bad boxes comes out as an :class:`ItemError` and the run goes on."""
        loader = make_loader(items, self.input_cfg, num_workers=options.num_workers, max_pixels=options.max_pixels)
        errors: list[ItemError] = []

        def decoded() -> Iterator[tuple[InferenceItem, PreparedImage, Optional[Proposals]]]:
            for loaded in iter_loaded(loader, items):  # raises if the loader ends before every image came
                it = items[loaded.index]
                if loaded.error is not None or loaded.prepared is None:
                    errors.append(ItemError(it, loaded.error or f"{it.file_name}: could not be decoded"))
                    continue
                region = None
                if it.boxes is not None:
                    try:
                        region = self.user_regions(it.boxes, loaded.prepared, image_name=it.file_name,
                                                   source=boxes_source)
                    except BadBoxesError as e:
                        errors.append(ItemError(it, str(e)))
                        continue
                    except Exception as e:  # per image, whatever it is (never a StopIteration ending the stream)
                        errors.append(ItemError(it, f"{it.file_name}: {type(e).__name__} while preparing its "
                                                    f"boxes ({e})"))
                        continue
                yield it, loaded.prepared, region

        for group in batch_by_size(decoded(), options.batch_size, lambda g: g[1].resized_hw,
                                   pad_mixed_sizes=options.pad_mixed_sizes):
            yield from errors
            errors.clear()
            yield _batch(group)
        yield from errors

    def run(self, items: Sequence[InferenceItem], vocabulary: Vocabulary, options: RunOptions = RunOptions(), *,
            boxes_source: str = "") -> Iterator[ImageResult]:
        """Detections for many images, streamed (decode in workers, batch, detect); one :class:`ImageResult` per
        item, errors included, in completion order (equal-size batching can reorder; callers sort by item).
        A run that would end with fewer results than ``items`` raises :class:`IncompleteRunError` instead."""
        if getattr(self.model, "rpn", None) is None and any(it.boxes is None for it in items):
            # a settings error, raised once before any work (run_batch would report it for every image)
            raise RuntimeError("this model has no region proposal network: give every image boxes (GT/user-box "
                               "mode), or load RPN weights (e.g. --rpn-weights rpn_lvis_866.pth)")
        n = 0
        for b in self.iter_batches(items, options, boxes_source=boxes_source):
            if isinstance(b, ItemError):
                n += 1
                yield ImageResult(b.item, error=b.error)
                continue
            outs = run_batch(b, lambda bb: self.detect_prepared(bb.prepared, vocabulary, options, regions=bb.regions))
            for it, d in zip(b.items, outs):
                n += 1
                if isinstance(d, ItemError):
                    yield ImageResult(it, error=d.error)
                    continue
                d.image_id, d.file_name = it.image_id, it.file_name
                yield ImageResult(it, detections=d)
        if n != len(items):
            raise IncompleteRunError(f"the run gave {n} results for {len(items)} images (a bug in regionclip)")


def _name(image: Any, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _batch(group: Iterable[tuple[InferenceItem, PreparedImage, Optional[Proposals]]]) -> ItemBatch:
    group = list(group)
    regions = [g[2] for g in group]
    return ItemBatch([g[0] for g in group], [g[1] for g in group],
                     None if all(r is None for r in regions) else [
                         r if r is not None else Proposals(torch.zeros(0, 4), None) for r in regions])
