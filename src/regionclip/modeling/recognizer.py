"""The region-recognizer interface: what :mod:`regionclip.pipeline` needs from a model.

Two models implement it, side by side (composition, no inheritance): the CLIP-ResNet
:class:`regionclip.modeling.detector.RegionCLIPDetector` and the ViT / Swin / DaViT / FocalNet
:class:`regionclip.modeling.transformer.region_head.TransformerRegionDetector`. Everything above the model (the
API, the predictor, region extraction, evaluation, the demo) goes through the pipeline, which only uses these
members. ``chunk_size`` has no default here: the one default is the pipeline's
(:func:`regionclip.inference.hardware.default_chunk_size`, through ``RunOptions``).

Both torch detectors also have a ``forward`` (one batch tensor in, :class:`regionclip.modeling.detector.RegionOutputs`
out: the same stages in one call, for hooks, tracing and module wrappers); it is not part of this interface, which
exported-graph backends implement too.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ..structures import Proposals

# How class names are embedded for a model family (``regionclip.text.name_cache.class_embeddings``'s ``procedure``):
# the original's template mean for the CLIP ResNets (their classifier was trained on it), the zero-shot branch's
# normalised 2-template mean for the transformer families. Which one a checkpoint uses: LoadedCheckpoint.text_procedure.
TEXT_PROCEDURE_REGIONCLIP = "regionclip"
TEXT_PROCEDURE_ZEROSHOT_BRANCH = "zeroshot-branch"
TEXT_PROCEDURES = (TEXT_PROCEDURE_REGIONCLIP, TEXT_PROCEDURE_ZEROSHOT_BRANCH)


@runtime_checkable
class RegionRecognizer(Protocol):
    """A model that embeds image regions and classifies them against text embeddings.

    ``has_background``: True when :meth:`classify` returns a background column last ([R, K+1], RegionCLIP's
    ResNet classifier with its constant-0 background logit); False for [R, K] (the zero-shot branch's transformer
    path). Use :func:`foreground_probs` rather than slicing ``[:, :-1]``.
    """

    # read-only members (properties in the protocol), so that implementations may declare narrower types
    # (``Optional[nn.Linear]``, ``Optional[MaskHead]``, a class-level ``None``) and still conform
    @property
    def has_background(self) -> bool: ...

    @property
    def rpn(self) -> Optional[nn.Module]: ...

    @property
    def bbox_pred(self) -> Optional[nn.Module]: ...

    @property
    def mask_head(self) -> Optional[nn.Module]: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def compute_features(self, images: Sequence[Tensor]) -> Tensor: ...

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]: ...

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int,
                       return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]: ...

    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor: ...

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor) -> Tensor: ...

    def predict_masks(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int) -> list[Tensor]: ...


def foreground_probs(has_background: bool, probs: Tensor) -> Tensor:
    """[R, K] class probabilities of a ``classify`` output, whichever classifier produced it."""
    return probs[:, :-1] if has_background else probs
