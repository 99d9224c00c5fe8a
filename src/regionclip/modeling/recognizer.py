"""The region-recognizer interface shared by the CLIP-ResNet detector and the transformer region detectors.

Everything above the model (``RegionCLIP`` in :mod:`regionclip.api`, the predictor, region extraction, evaluation,
the demo) talks to a detector only through these members, so a ViT / Swin / DaViT / FocalNet region encoder
(:class:`regionclip.modeling.transformer.region_head.TransformerRegionDetector`) can stand in for
:class:`regionclip.modeling.detector.RegionCLIPDetector`.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor


@runtime_checkable
class RegionRecognizer(Protocol):
    """A detector that embeds image regions and classifies them against text embeddings.

    ``has_background``: True when :meth:`classify` returns a background column last ([R, K+1], RegionCLIP's
    ResNet classifier with its constant-0 background logit); False for [R, K] (the zero-shot branch's
    transformer path, spec §11.2). Use :func:`foreground_probs` rather than slicing ``[:, :-1]``.
    """

    has_background: bool

    @property
    def embed_dim(self) -> int:
        """D, the width of region and class embeddings."""

    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images [3, h_i, w_i] -> the padded batch's feature map [B, C, H', W']."""

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], **kwargs: Any) -> Tensor:
        """features from :meth:`compute_features`, per-image [R_i, 4] XYXY boxes (resized pixels) -> [sum R_i, D]
        raw region embeddings in input order."""

    def classify(self, region_emb: Tensor, class_embeddings: Optional[Tensor] = None) -> Tensor:
        """[R, D] region embeddings, [K, D] class embeddings (any norm; default the set vocabulary) -> softmax
        probabilities [R, K+1] (``has_background``) or [R, K]."""


def foreground_probs(detector: Any, probs: Tensor) -> Tensor:
    """[R, K] class probabilities of ``detector.classify``'s output, whichever classifier produced it."""
    return probs[:, :-1] if getattr(detector, "has_background", True) else probs
