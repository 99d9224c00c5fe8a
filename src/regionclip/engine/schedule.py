"""Optimiser and learning-rate schedule of detectron2's solver (docs/DESIGN.md#transfer-learning): SGD + linear warmup + step decay."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["SolverConfig", "lr_factor", "build_optimizer", "build_lr_scheduler"]


@dataclass(frozen=True)
class SolverConfig:
    """Optimisation settings. ``ims_per_batch`` is the *total* batch over all ranks and accumulation steps."""

    ims_per_batch: int = 16
    base_lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # detectron2: no decay on norm layers (none are trainable in RegionCLIP)
    warmup_iters: int = 5000
    warmup_factor: float = 0.001
    warmup_method: str = "linear"  # "linear" or "constant"
    steps: Tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    max_iter: int = 90000
    grad_accum: int = 1  # micro-batches per optimiser step (the batch per rank is divided by it)
    amp: str = "none"  # "none", "bf16" or "fp16" (fp16 uses a GradScaler; CUDA only)
    clip_grad_norm: Optional[float] = None  # the original clips nothing

    def __post_init__(self) -> None:
        if self.warmup_method not in ("linear", "constant"):
            raise ValueError(f"solver.warmup_method must be 'linear' or 'constant', got {self.warmup_method!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"solver.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"solver.steps must be increasing, got {self.steps}")
        if self.grad_accum < 1 or self.max_iter < 1 or self.ims_per_batch < 1:
            raise ValueError("solver.grad_accum, max_iter and ims_per_batch must be >= 1")


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of ``base_lr`` at ``iteration`` (detectron2 ``WarmupMultiStepLR``: warmup × gamma^#steps passed)."""
    decay = cfg.gamma ** bisect.bisect_right(list(cfg.steps), iteration)
    if iteration >= cfg.warmup_iters:
        return decay
    if cfg.warmup_method == "constant":
        return cfg.warmup_factor * decay
    alpha = iteration / cfg.warmup_iters
    return (cfg.warmup_factor * (1 - alpha) + alpha) * decay


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters; norm-layer parameters (if any were trainable) get ``weight_decay_norm``."""
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norm_types) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": cfg.weight_decay_norm})
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimiser step; its ``last_epoch`` is the iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
