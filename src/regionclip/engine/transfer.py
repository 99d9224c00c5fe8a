"""Open-vocabulary transfer learning recipes: typed config, building everything, running the engine (docs/DESIGN.md#transfer-learning).

A recipe is a YAML file with the sections of :class:`TransferConfig` (``model``, ``data``, ``roi``, ``solver``,
``train``); unknown keys are errors, and ``--set a.b=c`` overrides any field (values parsed as YAML).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import yaml
from torch import Tensor, nn

from ..checkpoint.io import load_into, load_state_dict, read_weight_file
from ..checkpoint.regionclip import class_embedding_file
from ..checkpoint.rpn_keys import rpn_state_dict_from_checkpoint
from ..config import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_STD,
    DetectorConfig,
    InputConfig,
    PostprocessConfig,
    from_dict,
    read_yaml_mapping,
)
from ..data.datasets import DetectionDataset, load_annotations, load_lvis_json, load_registered
from ..data.train_data import (
    TrainingDataset,
    load_segmentations,
)
from ..evaluation import evaluate_dataset
from ..evaluation.inference import dataset_predictor
from ..factory import build_detector, load_detector, load_text_tower
from ..modeling.detector import RegionCLIPDetector
from ..modeling.heads import MaskHead
from ..parallel.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from ..pipeline import Pipeline, RunOptions
from ..text.name_cache import class_embeddings
from ..text.vocabulary import Vocabulary
from ..weights.pretrained import resolve_weights
from .detection_task import DetectionTask, RoIConfig
from .schedule import SolverConfig
from .train import EngineConfig, Trainer, make_train_batches, prepare_run_dir, training_records

__all__ = ["TransferConfig", "ModelSection", "DataSection", "DatasetSection", "ClassesSection", "load_config",
           "apply_overrides", "build_task", "run_transfer"]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSection:
    """Detector to fine-tune. With ``weights`` the architecture is read off the checkpoint; without, ``arch`` is
    built with random weights (tests, experiments)."""

    weights: Optional[str] = None  # e.g. regionclip_pretrained-cc_rn50 (name or path)
    rpn_weights: Optional[str] = None  # offline RPN file (name or path); default: offline_* keys of `weights`
    rpn_overrides: dict = field(default_factory=dict)  # RPNConfig fields, e.g. {nms_thresh: 0.7}
    arch: Optional[DetectorConfig] = None
    box_regression: bool = True
    mask_head: bool = False
    freeze_at: int = 2
    temperature: float = 0.01
    input: InputConfig = field(default_factory=InputConfig)  # test-time resize (evaluation)
    postprocess: PostprocessConfig = field(default_factory=lambda: PostprocessConfig(
        soft_nms="gaussian", apply_box_deltas=True))
    export_text_encoder: bool = True  # copy lang_encoder.* of `weights` into saved checkpoints


@dataclass(frozen=True)
class DatasetSection:
    """A registered dataset name (docs/DESIGN.md#datasets) or an annotation json + image folder."""

    name: Optional[str] = None
    json: Optional[str] = None
    image_root: Optional[str] = None
    remove_rare: bool = False  # LVIS json given by path: drop rare categories (the 866-class base split)
    limit: Optional[int] = None  # first N images only


@dataclass(frozen=True)
class ClassesSection:
    """Class embeddings: concept files ([K, D], row i = contiguous class i of the dataset) or, when a file is not
    given, computed from the dataset's class names with the text encoder of ``text_weights``."""

    train_embeddings: Optional[str] = None
    test_embeddings: Optional[str] = None
    text_weights: Optional[str] = None  # default: model.weights


@dataclass(frozen=True)
class DataSection:
    train: DatasetSection = field(default_factory=DatasetSection)
    test: Optional[DatasetSection] = None
    data_root: str = "datasets"
    classes: ClassesSection = field(default_factory=ClassesSection)
    min_sizes: Tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    flip: bool = True
    sampler: str = "uniform"  # "uniform" (TrainingSampler) or "repeat_factor" (LVIS)
    repeat_threshold: float = 0.001
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True
    eval_regions: str = "rpn"  # "rpn" or "gt" for periodic evaluation


@dataclass(frozen=True)
class TransferConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    roi: RoIConfig = field(default_factory=RoIConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: EngineConfig = field(default_factory=EngineConfig)


# ---------------------------------------------------------------------------------------------- config files
def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["solver.base_lr=0.01", "data.train.json=x.json"]`` -> a copy of ``data`` with those values (YAML-parsed)."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. solver.max_iter=100), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ValueError(f"--set {key}: {p!r} is a value, not a section")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> TransferConfig:
    """Read a recipe (strict: unknown keys raise ``ValueError``) and apply ``--set`` overrides."""
    data = read_yaml_mapping(path, "model/data/roi/solver/train") if path is not None else {}
    return from_dict(TransferConfig, apply_overrides(data, overrides))


# ---------------------------------------------------------------------------------------------- building
def load_dataset(section: DatasetSection, data_root: str) -> DetectionDataset:
    if section.name and section.json:
        raise ValueError("a dataset is either a registered name or a json + image_root, not both")
    if section.name:
        ds = load_registered(section.name, data_root)
    elif section.json:
        if not section.image_root:
            raise ValueError(f"dataset json {section.json} needs image_root (the folder holding its images)")
        ds = load_annotations(section.json, section.image_root)
        if ds.kind == "lvis" and section.remove_rare:
            ds = load_lvis_json(section.json, section.image_root, remove_rare=True)
    else:
        raise ValueError("dataset: give a registered name (data.train.name) or data.train.json + image_root")
    if section.limit is not None:
        ds.records = ds.records[:section.limit]
    return ds


def _class_embeddings(path: Optional[str], names: list[str], text_weights: Optional[str], dim: int,
                      what: str) -> Tensor:

    if path is not None:
        emb = class_embedding_file(read_weight_file(resolve_weights(path)), str(path))
    else:
        if text_weights is None:
            raise ValueError(f"{what} class embeddings: give data.classes.{what}_embeddings (a concept file) or "
                             "model.weights / data.classes.text_weights (a checkpoint with a text encoder)")

        weights = resolve_weights(text_weights)
        emb = class_embeddings(names, weights, lambda: load_text_tower(weights))
    if emb.shape != (len(names), dim):
        raise ValueError(f"{what} class embeddings have shape {tuple(emb.shape)} but the dataset has {len(names)} "
                         f"classes and the model's embeddings are {dim}-d; row i must embed class i")
    return emb.float()


def build_detector_for_training(cfg: ModelSection) -> tuple[RegionCLIPDetector, dict[str, Tensor]]:
    """The detector (initial weights loaded, missing heads added) and the tensors to copy into exports."""

    extra: dict[str, Tensor] = {}
    det: RegionCLIPDetector
    if cfg.weights is not None:
        rpn = resolve_weights(cfg.rpn_weights) if cfg.rpn_weights else None
        loaded_det, loaded = load_detector(resolve_weights(cfg.weights), rpn, rpn_overrides=dict(cfg.rpn_overrides))
        if not isinstance(loaded_det, RegionCLIPDetector):
            raise ValueError(f"model.weights {cfg.weights}: fine-tuning trains the CLIP-ResNet RegionCLIP detector, "
                             f"but this checkpoint builds a {type(loaded_det).__name__}; give a RegionCLIP ResNet "
                             "checkpoint")
        det = loaded_det
        if (tuple(cfg.input.pixel_mean), tuple(cfg.input.pixel_std)) != (CLIP_PIXEL_MEAN, CLIP_PIXEL_STD):
            raise ValueError("model.input.pixel_mean/std must stay CLIP's for a CLIP backbone")
        if cfg.export_text_encoder:
            extra = {"lang_encoder." + k: v for k, v in loaded.split.text_encoder.items()}
    else:
        if cfg.arch is None:
            raise ValueError("model: give weights (a RegionCLIP checkpoint) or arch (random initialisation)")
        det = build_detector(replace(cfg.arch, input=cfg.input, box_regression=cfg.box_regression, mask_head=cfg.mask_head))
        if cfg.rpn_weights:

            if det.rpn is None:
                raise ValueError("model.rpn_weights given but model.arch.rpn is null")
            sd, _ = rpn_state_dict_from_checkpoint(load_state_dict(resolve_weights(cfg.rpn_weights)))
            load_into(det.rpn, sd, strict=True, source=str(cfg.rpn_weights))
    if cfg.box_regression and det.bbox_pred is None:
        det.bbox_pred = nn.Linear(det.embed_dim, 4)  # detectron2 init: N(0, 0.001), bias 0
        nn.init.normal_(det.bbox_pred.weight, std=0.001)
        nn.init.zeros_(det.bbox_pred.bias)
    if cfg.mask_head and det.mask_head is None:
        det.mask_head = MaskHead(det.backbone.res5_channels)
    det.temperature = cfg.temperature
    if det.rpn is None:
        logger.warning("no offline RPN: training samples GT boxes only and evaluation uses GT boxes — this is not "
                       "the original recipe (set model.rpn_weights)")
    return det, extra


@dataclass
class BuiltRun:
    task: DetectionTask
    train_set: TrainingDataset
    train_dataset: DetectionDataset
    test_dataset: Optional[DetectionDataset]
    test_embeddings: Optional[Tensor]
    repeat: Optional[Any]


def build_task(cfg: TransferConfig, dist: Optional[DistInfo] = None) -> BuiltRun:
    """Datasets, class embeddings (computed once on rank 0 and broadcast) and the :class:`DetectionTask`."""
    torch.manual_seed(cfg.train.seed)  # identical random initialisation of new heads on every rank
    det, extra = build_detector_for_training(cfg.model)
    train_ds = load_dataset(cfg.data.train, cfg.data.data_root)
    test_ds = load_dataset(cfg.data.test, cfg.data.data_root) if cfg.data.test is not None else None
    text_w = cfg.data.classes.text_weights or cfg.model.weights
    is_main = dist is None or dist.is_main
    train_emb = _class_embeddings(cfg.data.classes.train_embeddings, train_ds.class_names, text_w, det.embed_dim,
                                  "train") if is_main else None
    test_emb = None
    test_file = cfg.data.classes.test_embeddings
    if test_ds is not None:
        if is_main:
            test_emb = _class_embeddings(test_file, test_ds.class_names, text_w, det.embed_dim, "test")
    elif test_file:  # a file without a test set: rows are taken as they are
        test_emb = class_embedding_file(read_weight_file(test_file)) if is_main else None
    train_emb, test_emb = broadcast_object((train_emb, test_emb))
    records, repeat = training_records(train_ds.records, len(train_ds.class_names), filter_empty=cfg.data.filter_empty,
                                       sampler=cfg.data.sampler, repeat_threshold=cfg.data.repeat_threshold)
    train_ds.records = records
    segs = load_segmentations(train_ds) if cfg.model.mask_head else None
    train_set = TrainingDataset(records, cfg.data.min_sizes, cfg.data.max_size, cfg.data.flip, segs)
    task = DetectionTask(det, train_emb, cfg.roi, test_embeddings=test_emb, freeze_at=cfg.model.freeze_at,
                         export_extra=extra)
    return BuiltRun(task, train_set, train_ds, test_ds, test_emb, repeat)


def make_batch_iterator(built: BuiltRun, cfg: TransferConfig, dist: DistInfo) -> Callable[[int], Any]:
    return make_train_batches(built.train_set, cfg.solver, cfg.train, dist,
                              aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, repeat=built.repeat)


def make_evaluate(built: BuiltRun, cfg: TransferConfig) -> Optional[Callable[[int], Optional[dict[str, Any]]]]:
    if built.test_dataset is None or built.test_embeddings is None:
        return None

    det = built.task.detector
    test_dataset = built.test_dataset  # bound here: the closure below needs the non-None type
    regions = cfg.data.eval_regions if det.rpn is not None else "gt"
    vocab = Vocabulary.create(built.test_embeddings, built.test_dataset.class_names, built.test_dataset.category_ids,
                              embed_dim=det.embed_dim, source="test-class embeddings")
    predict = dataset_predictor(Pipeline(det, cfg.model.input), vocab, RunOptions(postprocess=cfg.model.postprocess),
                                regions)

    def evaluate(iteration: int) -> Optional[dict[str, Any]]:
        out = Path(cfg.train.output_dir) / f"eval_{iteration:07d}"
        metrics = evaluate_dataset(test_dataset, predict, out, resume=False, progress=cfg.train.progress,
                                   meta={"iteration": iteration})
        if metrics is None:
            return None
        # per-class APs stay in eval_*/metrics.json; the log keeps the summary numbers
        return {k: v for k, v in metrics.items() if not k.startswith("AP-")}

    return evaluate


def run_transfer(cfg: TransferConfig, *, resume: bool = False,
                 hooks: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> dict[str, Any]:
    """Train (on every ``torchrun`` rank, or a single process) and return rank 0's last metrics."""
    dist = init_distributed(cfg.train.device, cfg.train.backend)
    try:
        prepare_run_dir(cfg, cfg.train.output_dir, dist)
        built = build_task(cfg, dist)
        trainer = Trainer(built.task, cfg.solver, cfg.train, dist, make_batch_iterator(built, cfg, dist),
                          evaluate=make_evaluate(built, cfg), hooks=hooks)
        return trainer.train(resume=resume)
    finally:
        cleanup()
