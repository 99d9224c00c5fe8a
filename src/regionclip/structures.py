"""Typed containers returned by the public API."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


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

        return Detections(mv(self.boxes), mv(self.scores), mv(self.labels), self.image_size, self.class_names,
                          mv(self.region_index), mv(self.probs), mv(self.masks), self.image_id, self.file_name,
                          mv(self.features))

    def to_coco_json(self, image_id: Any, category_ids: Optional[Sequence[int]] = None) -> list[dict]:
        """COCO results format (``bbox`` XYWH in original pixels), as the original's
        ``coco_instances_results.json`` / ``lvis_instances_results.json``. ``category_ids[label]`` maps the
        contiguous label to a dataset id (default: label + 1, the LVIS convention)."""
        out = []
        boxes = self.boxes.detach().float().cpu()
        for b, s, l in zip(boxes.tolist(), self.scores.detach().float().cpu().tolist(), self.labels.tolist()):
            cid = int(category_ids[l]) if category_ids is not None else int(l) + 1
            out.append({"image_id": image_id, "category_id": cid,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
        return out
