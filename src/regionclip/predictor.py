"""SAM-style predictor: set an image once (CLIP res4 computed and cached), then ask about any boxes.

>>> from regionclip import RegionCLIP
>>> from regionclip.predictor import RegionPredictor
>>> predictor = RegionPredictor(RegionCLIP.from_pretrained("regionclip_pretrained-cc_rn50"))
>>> predictor.set_image("street.jpg")                                   # backbone runs once
>>> out = predictor.classify_boxes([[10, 20, 200, 180]], ["car", "bus"])  # res5 + attnpool per box only
>>> out.names, out.probs.shape                                          # (['car'], torch.Size([1, 3]))
>>> feats = predictor.encode_boxes(boxes, normalize=True)               # [R, D] region embeddings
>>> dets = predictor.detect(["car", "bus"])                             # RPN proposals, cached res4 reused

Boxes are XYXY in *original-image* pixels. The RoI head (RoIAlign -> CLIP layer4 -> attnpool) runs in chunks of
``chunk_size`` regions, so memory is bounded for any number of boxes and the result does not depend on the chunk
size (every region is computed independently).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import RegionCLIP
from .data.images import ImageInput
from .modeling.recognizer import foreground_probs
from .pipeline import Pipeline, RunOptions
from .structures import Detections, PreparedImage
from .text.vocabulary import MemoKey, Vocabulary, VocabularyLike, resolve_memoised


@dataclass
class BoxClassification:
    """Zero-shot classification of R boxes of one image.

    probs: [R, K+1] softmax over the K classes and background (last column), as the original's box predictor
        ([R, K] for transformer models, which have no background column).
    labels: [R] int64 best *foreground* class per box. scores: [R] its probability.
    background: [R] probability of the background column.
    """

    probs: Tensor
    labels: Tensor
    scores: Tensor
    class_names: list[str]

    @property
    def background(self) -> Tensor:
        return self.probs[:, -1] if self.probs.shape[1] > len(self.class_names) else self.probs.new_zeros(len(self))

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels.tolist()]

    def __len__(self) -> int:
        return int(self.probs.shape[0])


class RegionPredictor:
    """Compute an image's CLIP res4 map once, then encode / classify / detect any regions of it.

    A thin front end over :class:`regionclip.pipeline.Pipeline` (the same stages every entry point runs).

    Args:
        model: a :class:`regionclip.api.RegionCLIP` (class names are embedded with the checkpoint's own text
            encoder, and the model's resolved settings are used for :meth:`detect`).
        chunk_size: regions per region-head call (None: the device default). Peak memory grows with the chunk, not
            with the number of boxes.
        dtype: compute dtype of the backbone and region head (``float32``, ``bfloat16``, ``float16``).
    """

    def __init__(self, model: RegionCLIP, *, chunk_size: Optional[int] = RunOptions.chunk_size,
                 dtype: str = RunOptions.dtype) -> None:
        if not isinstance(model, RegionCLIP):
            raise TypeError(f"RegionPredictor needs a RegionCLIP (RegionCLIP.from_pretrained(...)), got "
                            f"{type(model).__name__}")
        self.model = model
        self.pipeline: Pipeline = model.pipeline
        self.options = model.run_options(chunk_size=chunk_size, dtype=dtype)
        self._vocab_cache: dict[MemoKey, Vocabulary] = {}
        self.reset_image()

    # ------------------------------------------------------------------ image state
    def reset_image(self) -> None:
        """Forget the current image (frees its cached res4 map)."""
        self._prepared: Optional[PreparedImage] = None
        self._res4: Optional[Tensor] = None

    @torch.no_grad()
    def set_image(self, image: ImageInput) -> "RegionPredictor":
        """Decode + resize and run the backbone up to res4 once; later calls reuse the map."""
        self.reset_image()
        prepared = self.pipeline.prepare(image)
        self._res4 = self.pipeline.features([prepared], self.options)
        self._prepared = prepared
        return self

    @property
    def is_image_set(self) -> bool:
        return self._res4 is not None

    @property
    def original_size(self) -> tuple[int, int]:
        """(H, W) of the image as given: the frame of all boxes in and out."""
        return self._require_image().original_hw

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) after the test-time resize: the frame the model sees."""
        return self._require_image().resized_hw

    @property
    def features(self) -> Tensor:
        """The cached res4 map [1, C4, ~H/16, ~W/16]."""
        self._require_image()
        assert self._res4 is not None
        return self._res4

    def _require_image(self) -> PreparedImage:
        if self._prepared is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")
        return self._prepared

    def _options(self, chunk_size: Optional[int]) -> RunOptions:
        return self.options if not chunk_size else self.options.override(chunk_size=chunk_size)

    # ------------------------------------------------------------------ regions
    @torch.no_grad()
    def encode_boxes(self, boxes: Any, *, normalize: bool = False, chunk_size: Optional[int] = None) -> Tensor:
        """Region embeddings of user boxes.

        Args:
            boxes: [R, 4] XYXY in original-image pixels (tensor, array or nested list; R may be 0). Boxes sticking
                out of the image are clipped (as GT boxes in the original); empty boxes raise.
            normalize: L2-normalise each row (what cosine similarities need); default raw attnpool output, like
                the original's ``extract_region_features``.
            chunk_size: regions per region-head call (default: the predictor's).

        Returns:
            [R, D] float32 in input order (D = 1024 for RN50, 640 for RN50x4).
        """
        regions = self.pipeline.user_regions(_as_boxes(boxes), self._require_image())
        emb = self.pipeline.encode(self.features, [regions.boxes], self._options(chunk_size))
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def classify_boxes(self, boxes: Any, vocab: VocabularyLike = None, *, chunk_size: Optional[int] = None
                       ) -> BoxClassification:
        """Zero-shot classification of user boxes (the original's GT-box mode, without thresholds or NMS).

        Args:
            boxes: [R, 4] XYXY, original-image pixels.
            vocab: class names (list, ``"car,bus"``, a text file or a built-in name such as ``coco65``), a [K, D]
                embedding tensor, ``(names, tensor)``, a :class:`Vocabulary`, or None for the model's vocabulary.

        Returns:
            :class:`BoxClassification` with probs [R, K(+1)] (background last when the model has one), labels [R],
            scores [R].
        """
        v = self.vocabulary(vocab)
        probs = self.pipeline.classify(self.encode_boxes(boxes, chunk_size=chunk_size), v)
        fg = foreground_probs(self.pipeline.model.has_background, probs)
        scores, labels = fg.max(dim=1) if len(probs) else (probs.new_zeros(0), probs.new_zeros(0).long())
        return BoxClassification(probs=probs, labels=labels, scores=scores, class_names=list(v.names))

    @torch.no_grad()
    def detect(self, vocab: VocabularyLike = None, *, boxes: Any = None, options: Optional[RunOptions] = None,
               **overrides: Any) -> Detections:
        """Full detection on the set image, reusing its cached res4 map.

        Args:
            vocab: as in :meth:`classify_boxes`.
            boxes: optional [R, 4] user boxes (original pixels) -> GT mode (no RPN, no box deltas, no RPN score
                multiplication); default RPN proposals.
            options: full :class:`RunOptions`; default this predictor's with ``overrides`` by field name
                (``score_thresh=0.1``, ``max_proposals=100``, ...; :meth:`RunOptions.override`).
        """
        prepared = self._require_image()
        if options is not None and overrides:
            raise TypeError(f"give either options= or field overrides {sorted(overrides)}, not both "
                            "(options.override(...) combines them)")
        opts = options or self.options.override(**overrides)
        regions = None if boxes is None else [self.pipeline.user_regions(_as_boxes(boxes), prepared)]
        return self.pipeline.detect_prepared([prepared], self.vocabulary(vocab), opts, regions=regions,
                                             features=self.features)[0]

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self, vocab: VocabularyLike = None) -> Vocabulary:
        """Resolve ``vocab`` to a validated :class:`Vocabulary`. Names are embedded once with the checkpoint's text
        encoder (on-disk cache) and memoised in this predictor; None is the model's vocabulary
        (:func:`regionclip.text.vocabulary.resolve_memoised` over ``RegionCLIP.make_vocabulary``)."""
        return resolve_memoised(vocab, self.model.make_vocabulary, self._vocab_cache,
                                current=lambda: self.model.require_vocabulary())


def _as_boxes(boxes: Any) -> Tensor:
    """Any [R, 4]-like input as a tensor (an empty list becomes float32 [0, 4]). The dtype is kept: whole-number
    boxes are scaled like the original's mapper (see Pipeline.user_regions)."""
    b = torch.as_tensor(boxes)
    return b.float().reshape(0, 4) if b.numel() == 0 else b
