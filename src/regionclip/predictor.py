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
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.images import ImageInput
from .modeling.detector import PreparedImage, RegionCLIPDetector
from .modeling.recognizer import foreground_probs
from .structures import Detections

# names ("car,bus" / ["car", "bus"] / a built-in vocabulary name), a [K, D] embedding tensor, or names + tensor
Vocabulary = Union[str, Sequence[str], Tensor, tuple[Sequence[str], Tensor], None]


@dataclass
class BoxClassification:
    """Zero-shot classification of R boxes of one image.

    probs: [R, K+1] softmax over the K classes and background (last column), as the original's box predictor.
    labels: [R] int64 best *foreground* class per box. scores: [R] its probability.
    background: [R] probability of the background column.
    """

    probs: Tensor
    labels: Tensor
    scores: Tensor
    class_names: list[str]

    @property
    def background(self) -> Tensor:
        return self.probs[:, -1]

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels.tolist()]

    def __len__(self) -> int:
        return int(self.probs.shape[0])


class RegionPredictor:
    """Compute an image's CLIP res4 map once, then encode / classify / detect any regions of it.

    Args:
        model: a :class:`regionclip.api.RegionCLIP` (class names can then be turned into text embeddings with the
            checkpoint's own text encoder) or a bare :class:`RegionCLIPDetector` (pass embedding tensors as vocab).
        chunk_size: regions per RoI-head call (default: the detector's ``region_chunk_size``). Peak memory grows
            with the chunk, not with the number of boxes.
    """

    def __init__(self, model: Any, *, chunk_size: Optional[int] = None) -> None:
        if isinstance(model, RegionCLIPDetector):
            self.detector, self.model = model, None
        elif isinstance(getattr(model, "detector", None), RegionCLIPDetector):
            self.detector, self.model = model.detector, model
        else:
            raise TypeError(f"RegionPredictor needs a RegionCLIP or RegionCLIPDetector, got {type(model).__name__}")
        self.chunk_size = chunk_size
        self._vocab_cache: dict[tuple[str, ...], Tensor] = {}
        self.reset_image()

    # ------------------------------------------------------------------ image state
    def reset_image(self) -> None:
        """Forget the current image (frees its cached res4 map)."""
        self._prepared: Optional[PreparedImage] = None
        self._res4: Optional[Tensor] = None

    @torch.no_grad()
    def set_image(self, image: ImageInput) -> "RegionPredictor":
        """Decode + resize (spec §2.1) and run the backbone up to res4 once; later calls reuse the map."""
        self.reset_image()
        prepared = self.detector.prepare(image)
        self._res4 = self.detector.compute_res4([prepared.image])
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

    # ------------------------------------------------------------------ regions
    @torch.no_grad()
    def encode_boxes(self, boxes: Any, *, normalize: bool = False, chunk_size: Optional[int] = None) -> Tensor:
        """Region embeddings of user boxes.

        Args:
            boxes: [R, 4] XYXY in original-image pixels (tensor, array or nested list; R may be 0). Boxes sticking
                out of the image are clipped (as GT boxes in the original); empty boxes raise.
            normalize: L2-normalise each row (what cosine similarities need); default raw attnpool output, like
                the original's ``extract_region_features``.
            chunk_size: regions per RoI-head call (default: the predictor's / detector's).

        Returns:
            [R, D] float32 in input order (D = 1024 for RN50, 640 for RN50x4).
        """
        prepared = self._require_image()
        regions = self.detector.regions_from_user_boxes(_as_boxes(boxes), prepared)
        emb = self.detector.encode_regions(self.features, [regions.boxes],
                                           chunk_size=chunk_size or self.chunk_size).float()
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def classify_boxes(self, boxes: Any, vocab: Vocabulary = None, *, chunk_size: Optional[int] = None
                       ) -> BoxClassification:
        """Zero-shot classification of user boxes (the original's GT-box mode, without thresholds or NMS).

        Args:
            boxes: [R, 4] XYXY, original-image pixels.
            vocab: class names (list, ``"car,bus"``, a text file or a built-in name such as ``coco65``), a [K, D]
                embedding tensor, ``(names, tensor)``, or None for the model's current vocabulary.

        Returns:
            :class:`BoxClassification` with probs [R, K+1] (background last), labels [R], scores [R].
        """
        emb, names = self.vocabulary(vocab)
        region_emb = self.encode_boxes(boxes, chunk_size=chunk_size)
        probs = self.detector.classify(region_emb, emb)
        fg = foreground_probs(self.detector, probs)  # [R, K] whether or not the classifier has a background column
        scores, labels = fg.max(dim=1) if len(probs) else (probs.new_zeros(0), probs.new_zeros(0).long())
        return BoxClassification(probs=probs, labels=labels, scores=scores, class_names=names)

    @torch.no_grad()
    def detect(self, vocab: Vocabulary = None, *, boxes: Any = None, **kwargs: Any) -> Detections:
        """Full detection on the set image, reusing its cached res4 map.

        Args:
            vocab: as in :meth:`classify_boxes`.
            boxes: optional [R, 4] user boxes (original pixels) -> GT mode (no RPN, no box deltas, no RPN score
                multiplication); default RPN proposals.
            **kwargs: passed to :meth:`RegionCLIPDetector.detect_prepared` (``postprocess``, ``keep_probs``,
                ``keep_features``).

        Returns:
            :class:`Detections` in original-image pixels.
        """
        prepared = self._require_image()
        emb, names = self.vocabulary(vocab)
        regions = None
        if boxes is not None:
            regions = [self.detector.regions_from_user_boxes(_as_boxes(boxes), prepared)]
        return self.detector.detect_prepared([prepared], regions, class_embeddings=emb, class_names=names,
                                             res4=self.features, **kwargs)[0]

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self, vocab: Vocabulary = None) -> tuple[Tensor, list[str]]:
        """Resolve ``vocab`` to ([K, D] embeddings on the model's device, K names). Names are embedded once with
        the checkpoint's text encoder (81 prompt templates, on-disk cache) and memoised in this predictor."""
        det = self.detector
        if vocab is None:
            if det.class_embeddings.numel() == 0:
                raise ValueError("no vocabulary: pass class names or a [K, D] embedding tensor, or call "
                                 "model.set_vocabulary(...) first")
            return det.class_embeddings, list(det.class_names)
        if isinstance(vocab, tuple) and len(vocab) == 2 and isinstance(vocab[1], Tensor):
            names, emb = [str(n) for n in vocab[0]], vocab[1]
        elif isinstance(vocab, Tensor):
            emb = vocab[None] if vocab.ndim == 1 else vocab
            names = [str(i) for i in range(emb.shape[0])]
        else:
            from .api import parse_names

            names = parse_names(vocab)
            emb = self._embed_names(names)
        emb = torch.as_tensor(emb).float().to(det.device)
        if emb.ndim != 2 or emb.shape[1] != det.embed_dim or emb.shape[0] != len(names):
            raise ValueError(f"vocabulary embeddings must be [K, {det.embed_dim}] with one row per name "
                             f"({len(names)} names), got shape {tuple(emb.shape)}; use embeddings made with this "
                             "model's CLIP (1024-d RN50, 640-d RN50x4)")
        return emb, names

    def _embed_names(self, names: list[str]) -> Tensor:
        key = tuple(names)
        if key not in self._vocab_cache:
            if self.model is None or not hasattr(self.model, "embed_names"):
                raise ValueError("class names need the checkpoint's text encoder: build the predictor from "
                                 "RegionCLIP.from_pretrained(...), or pass a [K, D] embedding tensor as vocab")
            # RegionCLIP.embed_names picks the text procedure of the checkpoint (81 templates, on-disk cache)
            self._vocab_cache[key] = self.model.embed_names(names)
        return self._vocab_cache[key]

def _as_boxes(boxes: Any) -> Tensor:
    """Any [R, 4]-like input as a tensor (an empty list becomes float32 [0, 4]). The dtype is kept: whole-number
    boxes are scaled like the original's mapper (see RegionCLIPDetector.regions_from_user_boxes)."""
    b = torch.as_tensor(boxes)
    return b.float().reshape(0, 4) if b.numel() == 0 else b
