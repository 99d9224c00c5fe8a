"""Training the class-agnostic offline RPN (``regionclip train-rpn``; docs/RPN.md).

detectron2's ``ProposalNetwork`` (R50-FPN or R50-C4 trunk + ``StandardRPNHead``) trained on the boxes of a COCO /
LVIS json with the RPN losses of :mod:`regionclip.losses.rpn`, driven by the generic engine of
:mod:`regionclip.engine.train` (SGD + warmup + steps, AMP, DDP under torchrun, exact ``--resume``). The weights
are saved in the detectron2 RPN layout (``backbone.*``, ``proposal_generator.*``), so a checkpoint of the run loads
as ``--rpn-weights`` unchanged.

A recipe is a YAML file with the sections of :class:`RPNTrainConfig`; ``configs/rpn_coco48_c4.yaml`` and
``configs/rpn_lvis866_fpn.yaml`` are the settings of the original's base-class RPNs (docs/RPN.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..checkpoint.io import load_into, load_state_dict
from ..checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from ..config import InputConfig, RPNConfig, from_dict, read_yaml_mapping
from ..data.train_data import (
    TrainingDataset,
    TrainSample,
)
from ..evaluation.proposals import evaluate_proposals
from ..losses.rpn import label_and_sample_anchors, rpn_losses
from ..modeling.rpn import OfflineRPN, build_offline_rpn
from ..modeling.rpn.anchors import anchors_for_features
from ..parallel.distributed import cleanup, init_distributed
from ..weights.pretrained import resolve_weights
from .schedule import SolverConfig
from .train import EngineConfig, Trainer, make_train_batches, prepare_run_dir, training_records
from .transfer import DatasetSection, apply_overrides, load_dataset

__all__ = ["RPNModelSection", "RPNDataSection", "RPNLossConfig", "RPNTrainConfig", "RPNTask", "load_rpn_config",
           "build_rpn_for_training", "init_rpn_like_detectron2", "run_rpn_training"]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RPNModelSection:
    """The RPN to train: ``weights`` (a released / trained RPN file: architecture read off it, training continues
    from it) or ``arch`` initialised as detectron2 does (optionally with a detectron2-named ResNet trunk
    ``trunk_weights``, e.g. ImageNet R-50 converted to ``stem.*`` / ``res2.*`` keys)."""

    weights: Optional[str] = None
    arch: RPNConfig = field(default_factory=RPNConfig.fpn)
    trunk_weights: Optional[str] = None
    freeze_at: int = 2  # detectron2 MODEL.BACKBONE.FREEZE_AT: stem (1) and res2 (2) stay fixed
    input: InputConfig = field(default_factory=InputConfig)  # evaluation: test resize (min_size / max_size) only
    eval_nms_thresh: float = 0.7  # proposals for the AR evaluation (detectron2's RPN.NMS_THRESH)


@dataclass(frozen=True)
class RPNLossConfig:
    """detectron2 ``MODEL.RPN`` training settings (defaults = detectron2's)."""

    iou_thresholds: Tuple[float, float] = (0.3, 0.7)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 0.0
    boundary_thresh: float = -1.0
    cls_weight: float = 1.0
    loc_weight: float = 1.0


@dataclass(frozen=True)
class RPNDataSection:
    train: DatasetSection = field(default_factory=DatasetSection)
    test: Optional[DatasetSection] = None  # AR@100/300/1000 at eval_period / the end
    data_root: str = "datasets"
    min_sizes: Tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    flip: bool = True
    sampler: str = "uniform"  # or "repeat_factor" (LVIS)
    repeat_threshold: float = 0.001
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True


@dataclass(frozen=True)
class RPNTrainConfig:
    model: RPNModelSection = field(default_factory=RPNModelSection)
    data: RPNDataSection = field(default_factory=RPNDataSection)
    loss: RPNLossConfig = field(default_factory=RPNLossConfig)
    # detectron2's solver defaults for a 16-image batch (Base-RCNN-*.yaml: LR 0.02, steps 60k/80k of 90k)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(base_lr=0.02, warmup_iters=1000))
    train: EngineConfig = field(default_factory=lambda: EngineConfig(output_dir="output/train_rpn"))


def load_rpn_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RPNTrainConfig:
    """Read an RPN recipe (strict: unknown keys raise ``ValueError``) and apply ``--set`` overrides."""
    data = read_yaml_mapping(path, "model/data/loss/solver/train") if path is not None else {}
    return from_dict(RPNTrainConfig, apply_overrides(data, overrides))


# ---------------------------------------------------------------------------------------------- model
def _trunk(rpn: OfflineRPN) -> nn.Module:
    """The ResNet of an RPN: ``backbone.bottom_up`` (FPN) or ``backbone`` itself (C4)."""
    trunk = rpn.backbone.bottom_up if rpn.cfg.arch == "fpn" else rpn.backbone
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"RPN trunk is a {type(trunk).__name__}, not a module")
    return trunk


def init_rpn_like_detectron2(rpn: OfflineRPN) -> OfflineRPN:
    """detectron2's initialisation of a fresh RPN (uses the global RNG): ResNet convs ``c2_msra_fill`` (He normal,
    fan_out), FPN convs ``c2_xavier_fill`` (Kaiming uniform, a=1), RPN head convs N(0, 0.01), biases 0; frozen BNs
    are the identity."""
    trunk = _trunk(rpn)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if rpn.cfg.arch == "fpn":
            for name, m in rpn.backbone.named_children():
                if name.startswith(("fpn_lateral", "fpn_output")) and isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=1)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in rpn.proposal_generator.rpn_head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return rpn


def build_rpn_for_training(cfg: RPNModelSection) -> OfflineRPN:
    """The RPN with its initial weights (``weights`` file, or ``arch`` + detectron2 init + ``trunk_weights``)."""
    if cfg.weights is not None:
        src = resolve_weights(cfg.weights)
        sd, _ = rpn_state_dict_from_checkpoint(load_state_dict(src))
        rpn = build_offline_rpn(infer_rpn_config(sd))
        load_into(rpn, sd, strict=True, source=str(src))
        return rpn
    rpn = init_rpn_like_detectron2(build_offline_rpn(cfg.arch))
    if cfg.trunk_weights is not None:
        src = resolve_weights(cfg.trunk_weights)
        raw = load_state_dict(src)
        trunk = _trunk(rpn)
        own = set(trunk.state_dict())
        # accept bare trunk keys (stem.*, res2.*) or keys under a detectron2 backbone prefix
        sd, ignored = {}, []
        for k, v in raw.items():
            name = next((k[len(p):] for p in ("", "backbone.bottom_up.", "backbone.")
                         if k.startswith(p) and k[len(p):] in own), None)
            if name is None:
                ignored.append(k)  # e.g. res5.* for a C4 trunk, fc.* of a classifier
            else:
                sd[name] = v
        load_into(trunk, sd, strict=True, source=str(src), ignored=ignored)
    return rpn


class RPNTask(nn.Module):
    """The engine's task: ``forward(list[TrainSample], generator)`` -> ``{"loss_rpn_cls", "loss_rpn_loc", ...}``.

    Wraps an :class:`OfflineRPN` (whose modules are the detectron2 layout) and makes its parameters trainable
    except the ``freeze_at`` first trunk stages. Exports ``rpn.state_dict()``: the released RPN files' keys.
    """

    def __init__(self, rpn: OfflineRPN, loss: RPNLossConfig = RPNLossConfig(), freeze_at: int = 2) -> None:
        super().__init__()
        if getattr(rpn.cfg, "trunk", "resnet") != "resnet":
            raise ValueError(f"train-rpn trains the detectron2 ResNet trunks (R50-FPN / R50-C4); this RPN has a "
                             f"{rpn.cfg.trunk!r} trunk (e.g. rpn_lvis_1203_clipbackbone), whose training recipe the "
                             "original does not release: start from rpn_lvis_866 or rpn_coco_48 instead")
        self.rpn = rpn
        self.loss_cfg = loss
        rpn.requires_grad_(True)  # OfflineRPN freezes itself for inference
        trunk = _trunk(rpn)
        frozen = ["stem"] + [f"res{i}" for i in range(2, freeze_at + 1)] if freeze_at >= 1 else []
        for name in frozen:
            if hasattr(trunk, name):
                getattr(trunk, name).requires_grad_(False)

    def forward(self, batch: Sequence[TrainSample], generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        rpn, lc = self.rpn, self.loss_cfg
        images, sizes = rpn.preprocess([s.image for s in batch])
        features = rpn.backbone(images)
        pg = rpn.proposal_generator
        logits, deltas = pg.rpn_head([features[f] for f in pg.in_features])
        grids = [(int(x.shape[-2]), int(x.shape[-1])) for x in logits]
        anchors = anchors_for_features(pg.cell_anchors, grids, pg.strides, pg.anchor_offset)
        n = len(batch)
        # [N, A, Hi, Wi] -> [N, Hi*Wi*A]; [N, 4A, Hi, Wi] -> [N, Hi*Wi*A, 4]: the anchors' order (detectron2)
        flat_logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        flat_deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                       for x in deltas]
        all_anchors = torch.cat(anchors)
        labels, matched = [], []
        with torch.no_grad():
            for s, size in zip(batch, sizes):
                lab, m = label_and_sample_anchors(
                    all_anchors, s.boxes.to(all_anchors.device).float(), size, iou_thresholds=lc.iou_thresholds,
                    batch_size_per_image=lc.batch_size_per_image, positive_fraction=lc.positive_fraction,
                    boundary_thresh=lc.boundary_thresh, generator=generator)
                labels.append(lab)
                matched.append(m)
        return rpn_losses(anchors, [x.float() for x in flat_logits], [x.float() for x in flat_deltas], labels,
                          matched, batch_size_per_image=lc.batch_size_per_image, smooth_l1_beta=lc.smooth_l1_beta,
                          cls_weight=lc.cls_weight, loc_weight=lc.loc_weight)

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.rpn.state_dict()

    def load_export_state_dict(self, sd: dict[str, Tensor]) -> None:
        load_into(self.rpn, sd, strict=True, source="RPN checkpoint")

    def inference_rpn(self, nms_thresh: float = 0.7, post_nms_topk: int = 1000) -> OfflineRPN:
        """A separate, frozen copy with test-time selection settings (for evaluation during training)."""
        rpn = build_offline_rpn(replace(self.rpn.cfg, nms_thresh=nms_thresh, post_nms_topk=post_nms_topk))
        rpn.load_state_dict(self.rpn.state_dict())
        return rpn.to(self.rpn.pixel_mean.device)


# ---------------------------------------------------------------------------------------------- running
def _make_evaluate(task: RPNTask, cfg: RPNTrainConfig) -> Optional[Callable[[int], Optional[dict[str, Any]]]]:
    if cfg.data.test is None:
        return None

    test = load_dataset(cfg.data.test, cfg.data.data_root)

    def evaluate(iteration: int) -> Optional[dict[str, Any]]:
        rpn = task.inference_rpn(cfg.model.eval_nms_thresh)
        return evaluate_proposals(rpn, test, cfg.model.input, progress=cfg.train.progress)

    return evaluate


def run_rpn_training(cfg: RPNTrainConfig, *, resume: bool = False,
                     hooks: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> dict[str, Any]:
    """Train (single process or every torchrun rank) and return rank 0's last logged metrics."""
    dist = init_distributed(cfg.train.device, cfg.train.backend)
    try:
        prepare_run_dir(cfg, cfg.train.output_dir, dist)
        torch.manual_seed(cfg.train.seed)  # identical random initialisation on every rank
        rpn = build_rpn_for_training(cfg.model)
        ds = load_dataset(cfg.data.train, cfg.data.data_root)
        records, repeat = training_records(ds.records, len(ds.class_names), filter_empty=cfg.data.filter_empty,
                                           sampler=cfg.data.sampler, repeat_threshold=cfg.data.repeat_threshold)
        train_set = TrainingDataset(records, cfg.data.min_sizes, cfg.data.max_size, cfg.data.flip)
        task = RPNTask(rpn, cfg.loss, cfg.model.freeze_at)
        batches = make_train_batches(train_set, cfg.solver, cfg.train, dist,
                                     aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, repeat=repeat)
        trainer = Trainer(task, cfg.solver, cfg.train, dist, batches, evaluate=_make_evaluate(task, cfg), hooks=hooks)
        return trainer.train(resume=resume)
    finally:
        cleanup()
