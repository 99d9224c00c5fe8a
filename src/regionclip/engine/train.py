"""Generic training engine: optimisation, AMP, gradient accumulation, DDP, checkpoints, exact resume, logging.

The engine knows nothing about detection. It drives a *task*: an ``nn.Module`` whose
``forward(batch, generator=...)`` returns a dict of scalar tensors; keys starting with ``loss`` are summed and
minimised, the others are only logged. Optionally the task implements ``export_state_dict()`` /
``load_export_state_dict(sd)`` to save its weights in a public layout (the detection task saves the original
RegionCLIP keys, so checkpoints load in ``regionclip detect``); otherwise its ``state_dict()`` is saved.

Files in ``output_dir``: ``model_<iter>.safetensors`` (weights), ``state_<iter>.pth`` (iteration, optimiser,
scheduler, grad-scaler and per-rank RNG states), ``last_checkpoint`` (JSON naming both; written last, so it only
ever points at complete files), ``metrics.jsonl`` (one JSON line per logged iteration / evaluation) and
``tensorboard/`` if TensorBoard is installed. Every file is written atomically.

Exactness of ``--resume``: the data order is replayed by index arithmetic (see
:mod:`regionclip.data.train_data`) and every random choice of a step comes from a generator seeded by
``(seed, iteration, micro-step, rank)``, so the losses after a resume equal those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint.io import read_weight_file, save_file_atomic
from ..config import to_dict
from ..data.train_data import (
    GroupedBatchSampler,
    TrainingDataset,
    TrainingSampler,
    filter_empty_records,
    repeat_factors,
)
from ..parallel.distributed import DistInfo, all_gather_object, barrier, reduce_dict_mean
from ..utils import atomic_path, write_json_atomic
from .schedule import SolverConfig, build_lr_scheduler, build_optimizer

__all__ = ["EngineConfig", "Trainer", "step_generator", "latest_checkpoint", "TrainingInterrupted"]
logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class EngineConfig:
    """Run settings (the ``train`` section of a recipe)."""

    output_dir: str = "output/train"
    seed: int = 0
    device: str = "auto"  # auto / cpu / cuda
    backend: Optional[str] = None  # default nccl (CUDA) / gloo (CPU)
    checkpoint_period: int = 5000
    eval_period: int = 25000  # 0: no periodic evaluation
    eval_at_end: bool = True
    eval_at_start: bool = False  # evaluate the initial weights too (a baseline for the log)
    log_period: int = 20
    progress: bool = True
    tensorboard: bool = True  # used only when installed
    find_unused_parameters: bool = False
    num_workers: int = 4


class TrainingInterrupted(RuntimeError):
    """Raised by hooks to stop a run (tests use it to simulate a crash)."""


def step_generator(seed: int, iteration: int, micro: int, rank: int) -> torch.Generator:
    """CPU generator for the random choices of one micro-step (RoI sampling), a pure function of its inputs."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, iteration, micro, rank]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s & 0x7FFFFFFFFFFFFFFF)


def latest_checkpoint(output_dir: str | Path) -> Optional[dict[str, Any]]:
    """``{"iteration", "model", "state"}`` of the newest complete checkpoint in ``output_dir``, or ``None``."""
    path = Path(output_dir) / LAST_CHECKPOINT
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    if not isinstance(np_state, tuple):  # legacy=True gives a tuple unless the global generator is not MT19937
        raise RuntimeError("numpy's global random generator is not MT19937; its state cannot be checkpointed")
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             # numpy/python states as plain lists so the file loads with weights_only=True
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _MetricsWriter:
    """Rank-0 JSONL (+ TensorBoard) writer. On resume, lines after the resumed iteration are dropped."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and (it := _line_iteration(ln)) is not None and it <= start_iter]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_iter + 1)
            except ImportError:
                logger.info("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            it = record["iteration"]
            for k, v in _flatten(record).items():
                if k != "iteration" and isinstance(v, (int, float)) and np.isfinite(v):
                    self.tb.add_scalar(k, v, it)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _line_iteration(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None  # a partial last line of a killed run


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


class Trainer:
    """Runs ``solver.max_iter`` optimiser steps of ``task`` on batches from ``make_batches``.

    Args:
        task: module returning a loss dict; wrapped in DDP when ``dist.world_size > 1``.
        solver: optimiser / schedule / AMP / accumulation settings.
        cfg: run settings.
        dist: this process' rank and device (:func:`regionclip.parallel.distributed.init_distributed`).
        make_batches: ``make_batches(start_micro_batch)`` -> infinite iterator of this rank's micro-batches,
            starting at the given micro-batch number (exact resume).
        evaluate: optional ``evaluate(iteration) -> metrics`` run on rank 0 with the task in eval mode.
        hooks: called on every rank after each step as ``hook(iteration, losses)``.
    """

    def __init__(self, task: nn.Module, solver: SolverConfig, cfg: EngineConfig, dist: DistInfo,
                 make_batches: Callable[[int], Iterator[Any]],
                 evaluate: Optional[Callable[[int], Optional[dict[str, Any]]]] = None,
                 hooks: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> None:
        self.task = task.to(dist.device)
        self.solver, self.cfg, self.dist = solver, cfg, dist
        self.make_batches, self.evaluate_fn, self.hooks = make_batches, evaluate, list(hooks)
        self.output_dir = Path(cfg.output_dir)
        self.optimizer = build_optimizer(self.task, solver)
        self.scheduler = build_lr_scheduler(self.optimizer, solver)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=solver.amp == "fp16")
        self.model: nn.Module = self.task
        if dist.distributed:
            self.model = DistributedDataParallel(
                self.task, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=cfg.find_unused_parameters)
        self.iteration = 0

    # ------------------------------------------------------------------ checkpoints
    def _export(self) -> dict[str, Tensor]:
        fn = getattr(self.task, "export_state_dict", None)
        sd = fn() if fn is not None else self.task.state_dict()
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save_checkpoint(self) -> None:
        """Weights (rank 0) + optimiser/scheduler/scaler + every rank's RNG state, then ``last_checkpoint``."""
        rng = all_gather_object(_rng_state(self.dist.device))
        if self.dist.is_main:
            it = self.iteration
            model_name, state_name = f"model_{it:07d}.safetensors", f"state_{it:07d}.pth"
            save_file_atomic(self._export(), self.output_dir / model_name)
            save_file_atomic({"iteration": it, "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                              "rng": rng, "world_size": self.dist.world_size}, self.output_dir / state_name)
            write_json_atomic({"iteration": it, "model": model_name, "state": state_name},
                              self.output_dir / LAST_CHECKPOINT)
        barrier()

    def resume(self, checkpoint: Optional[dict[str, Any]] = None) -> int:
        """Restore the newest checkpoint of ``output_dir`` (or the given ``last_checkpoint`` record); returns the
        iteration to continue from (0 when there is nothing to resume)."""
        ckpt = checkpoint or latest_checkpoint(self.output_dir)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
            return 0
        sd = read_weight_file(self.output_dir / ckpt["model"])
        load = getattr(self.task, "load_export_state_dict", None)
        if load is not None:
            load(sd)
        else:
            self.task.load_state_dict(sd)
        state = torch.load(self.output_dir / ckpt["state"], map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] == self.dist.world_size:
            _set_rng_state(state["rng"][self.dist.rank], self.dist.device)
        else:  # still a valid continuation, just not bit-identical to the original run
            logger.warning("checkpoint was written by %d processes, this run has %d: RNG states not restored and "
                           "the data order differs from an uninterrupted run", state["world_size"],
                           self.dist.world_size)
        self.iteration = int(state["iteration"])
        return self.iteration

    def _check_sync(self) -> Optional[list[float]]:
        """Per-rank checksum of the trainable weights; DDP must keep them identical."""
        if not self.dist.distributed:
            return None
        with torch.no_grad():
            s = float(sum(p.double().sum() for p in self.task.parameters() if p.requires_grad))
        sums = all_gather_object(s)
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"DDP ranks disagree on the weights at iteration {self.iteration}: {sums}")
        return sums

    # ------------------------------------------------------------------ loop
    def _step(self, batches: Iterator[Any]) -> dict[str, Tensor]:
        s = self.solver
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.amp)
        self.optimizer.zero_grad(set_to_none=True)
        summed: dict[str, Tensor] = {}
        for micro in range(s.grad_accum):
            batch = next(batches)
            sync = self.dist.distributed and micro < s.grad_accum - 1
            # self.model is DistributedDataParallel exactly when distributed (see __init__)
            ctx = (self.model.no_sync() if sync and isinstance(self.model, DistributedDataParallel)
                   else contextlib.nullcontext())
            gen = step_generator(self.cfg.seed, self.iteration, micro, self.dist.rank)
            with ctx:
                with torch.autocast(self.dist.device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    losses = self.model(batch, generator=gen)
                total = sum(v.float() for k, v in losses.items() if k.startswith("loss"))
                if not isinstance(total, Tensor):
                    raise ValueError(f"the task returned no 'loss*' entries (got {sorted(losses)})")
                if not torch.isfinite(total):
                    raise FloatingPointError(f"loss became non-finite at iteration {self.iteration}: "
                                             f"{ {k: float(v) for k, v in losses.items()} }")
                self.scaler.scale(total / s.grad_accum).backward()
            for k, v in losses.items():
                summed[k] = summed.get(k, 0) + v.detach().float() / s.grad_accum
            summed["total_loss"] = summed.get("total_loss", 0) + total.detach() / s.grad_accum
        if s.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.task.parameters() if p.requires_grad], s.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return summed

    def _run_eval(self, metrics: _MetricsWriter) -> None:
        if self.evaluate_fn is None:
            return
        if self.dist.is_main:
            self.task.eval()
            try:
                result = self.evaluate_fn(self.iteration)
            finally:
                self.task.train()
            if result is not None:
                metrics.write({"iteration": self.iteration, "eval": result})
        barrier()

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``solver.max_iter``; returns the last logged metrics (and evaluation, if any)."""

        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self.resume() if resume else 0
        s, cfg = self.solver, self.cfg
        metrics = _MetricsWriter(self.output_dir, start, self.dist.is_main, cfg.tensorboard)
        batches = self.make_batches(start * s.grad_accum)
        self.task.train()
        bar = tqdm(total=s.max_iter, initial=start, desc="train", unit="it", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        last: dict[str, Any] = {}
        if cfg.eval_at_start and start == 0:
            self._run_eval(metrics)
        t_start, it_start = time.perf_counter(), start
        try:
            while self.iteration < s.max_iter:
                t0 = time.perf_counter()
                losses = self._step(batches)
                self.iteration += 1
                reduced = reduce_dict_mean(losses)
                bar.update(1)
                bar.set_postfix(loss=f"{reduced['total_loss']:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                if self.iteration % cfg.log_period == 0 or self.iteration == s.max_iter:
                    per_it = (time.perf_counter() - t_start) / max(1, self.iteration - it_start)
                    last = {"iteration": self.iteration, "lr": self.scheduler.get_last_lr()[0], **reduced,
                            "time": time.perf_counter() - t0, "eta_seconds": per_it * (s.max_iter - self.iteration)}
                    metrics.write(last)
                periodic = cfg.checkpoint_period > 0 and self.iteration % cfg.checkpoint_period == 0
                if periodic or self.iteration == s.max_iter:
                    sums = self._check_sync()
                    self.save_checkpoint()
                    if sums is not None:
                        metrics.write({"iteration": self.iteration, "param_checksums": sums})
                if (cfg.eval_period > 0 and self.iteration % cfg.eval_period == 0) or \
                        (self.iteration == s.max_iter and cfg.eval_at_end):
                    self._run_eval(metrics)
                for hook in self.hooks:  # last: a hook that stops the run sees everything of this step written
                    hook(self.iteration, reduced)
        finally:
            bar.close()
            metrics.close()
        return last


def prepare_run_dir(cfg: Any, output_dir: Any, dist: Any) -> Path:
    """Create the run folder and record the resolved config (``config.json``, rank 0 only, atomic)."""

    out = Path(output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(to_dict(cfg), out / "config.json", indent=1)
    return out


# ------------------------------------------------------------------------------ data shared by the training tasks
def training_records(records: Sequence[Any], num_classes: int, *, filter_empty: bool, sampler: str,
                     repeat_threshold: float) -> tuple[list[Any], Optional[np.ndarray]]:
    """The training images (without annotation-less ones when ``filter_empty``, as detectron2) and, for
    ``sampler="repeat_factor"`` (LVIS), their repeat factors; shared by ``train`` and ``train-rpn``."""
    kept = filter_empty_records(records) if filter_empty else list(records)
    if len(kept) < len(records):
        logger.info("removed %d training images without annotations", len(records) - len(kept))
    if sampler == "repeat_factor":
        return kept, repeat_factors(kept, num_classes, repeat_threshold)
    if sampler != "uniform":
        raise ValueError(f"data.sampler must be 'uniform' or 'repeat_factor', got {sampler!r}")
    return kept, None


def _collate(samples: list[Any]) -> list[Any]:
    return samples


def make_train_batches(train_set: TrainingDataset, solver: SolverConfig, engine: EngineConfig, dist: DistInfo, *,
                       aspect_ratio_grouping: bool, repeat: Optional[np.ndarray]) -> Callable[[int], Iterator[Any]]:
    """``Trainer``'s batch source: ``make(start_micro)`` iterates this rank's micro-batches from ``start_micro`` on
    (seeded sampler and grouping: exact resume), ``solver.ims_per_batch`` split over processes x accumulation."""
    per_rank, rest = divmod(solver.ims_per_batch, dist.world_size * solver.grad_accum)
    if rest or per_rank == 0:
        raise ValueError(f"solver.ims_per_batch={solver.ims_per_batch} must be a multiple of processes x grad_accum "
                         f"= {dist.world_size} x {solver.grad_accum}")
    groups = train_set.aspect_groups() if aspect_ratio_grouping else None

    def make(start_micro: int) -> Iterator[Any]:
        sampler = TrainingSampler(len(train_set), engine.seed, dist.rank, dist.world_size, repeat)
        batches = GroupedBatchSampler(sampler, per_rank, groups, seed=engine.seed, start_batch=start_micro)
        return iter(torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=_collate,
                                                num_workers=engine.num_workers,
                                                persistent_workers=engine.num_workers > 0))

    return make
