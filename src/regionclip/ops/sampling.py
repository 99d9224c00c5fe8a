"""Random subsampling of labelled candidates (detectron2's ``subsample_labels``): a pure op shared by the RoI
sampler of transfer learning (:mod:`regionclip.engine.roi_sampling`) and the RPN's anchor sampler
(:mod:`regionclip.losses.rpn`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int,
                     generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """detectron2 ``subsample_labels``: indices of at most ``num_samples * positive_fraction`` random positives
    (label not -1 and not ``bg_label``) and negatives to fill up to ``num_samples``.

    Randomness comes from ``generator`` (CPU) so a training run can make it a pure function of the iteration.
    The draws are the original's: ``randperm(#positives)`` then ``randperm(#negatives)``, so a generator in the
    state of the original's global RNG picks the same RoIs in the same order (docs/TRAINING.md#fidelity).
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm1 = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)
    perm2 = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)
    return positive[perm1], negative[perm2]
