"""Typed containers returned by the public API."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class PreparedImage:
    """A decoded image resized for the model (uint8 RGB [3, h, w]) and both frames' sizes."""

    image: Tensor
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(resized / original) along x and y: the factors that map original-frame boxes into the model's frame."""
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]


@dataclass
class Proposals:
    """Class-agnostic regions of one image in resized-image coordinates (XYXY, float32)."""

    boxes: Tensor  # [R, 4]
    objectness_logits: Optional[Tensor] = None  # [R] raw RPN logits (None for user/GT boxes)


@dataclass
class Detections:
    """Detections of one image.

    boxes: [N, 4] XYXY float32 in *original* image pixels. scores: [N]. labels: [N] int64 contiguous class index
    into ``class_names``. ``region_index`` maps each detection to the input region (proposal / user box) it came
    from. ``probs`` optionally holds the full [N, K+1] softmax row (background last) before RPN multiplication.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image_size: tuple[int, int]  # original (H, W)
    class_names: Sequence[str] = field(default_factory=list)
    region_index: Optional[Tensor] = None
    probs: Optional[Tensor] = None
    masks: Optional[Tensor] = None  # [N, H, W] bool, LVIS fine-tuned checkpoints only
    features: Optional[Tensor] = None  # [N, D] raw attnpool embedding of each detection's source region
    image_id: Any = None
    file_name: Optional[str] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def names(self) -> list[str]:
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in self.labels.tolist()]

    def to(self, device: torch.device | str) -> "Detections":
        def mv(t):
            return t.to(device) if isinstance(t, Tensor) else t

        return dataclasses.replace(self, boxes=mv(self.boxes), scores=mv(self.scores), labels=mv(self.labels),
                                   region_index=mv(self.region_index), probs=mv(self.probs), masks=mv(self.masks),
                                   features=mv(self.features))
