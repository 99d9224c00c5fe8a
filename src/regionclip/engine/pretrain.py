"""Region-text pretraining recipes (docs/DESIGN.md#pretraining): typed config, building the model from OpenAI CLIP + RPN weights,
running the generic training engine (:class:`regionclip.engine.train.Trainer`).

A recipe is a YAML file with the sections of :class:`PretrainConfig`; values not given keep the *pretraining*
defaults below (the original's ``configs/pretrain/RegionCLIP_RN50.yaml``), unknown keys are errors, and
``--set a.b=c`` overrides any field.

Schedule of the original (docs/DESIGN.md#pretraining): SGD momentum 0.9, weight decay 1e-4, base lr 0.002 for 96 images
(32 GPUs x 3), linear warmup over 1000 iterations from 0.001, lr x0.1 at 300k and 525k, 600k iterations;
gradient clipping per parameter tensor at norm 5 (``clip_grad_per_parameter``, not the engine's global clip).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..checkpoint.embedding_files import load_concept_embeddings
from ..checkpoint.io import load_into, load_state_dict
from ..checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from ..config import ClipResNetConfig, ClipTextConfig, RPNConfig, from_dict, read_yaml_mapping, to_dict
from ..data.captions import CaptionDataset, ConcatCaptions, open_caption_source
from ..data.train_data import GroupedBatchSampler, TrainingSampler
from ..factory.clip_towers import load_clip_towers
from ..losses.region_text import clip_grad_norm_per_parameter_
from ..modeling.clip_resnet import ModifiedResNet
from ..modeling.detector import RegionCLIPDetector
from ..modeling.pretrainer import RegionTextConfig, RegionTextPretrainer
from ..modeling.rpn import build_offline_rpn
from ..modeling.text_encoder import CLIPTextTransformer, build_text_encoder
from ..parallel.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from ..text.embeddings import concept_embeddings
from ..text.vocabulary import read_names_file
from ..weights.pretrained import resolve_weights
from .schedule import SolverConfig
from .train import EngineConfig, Trainer, prepare_run_dir
from .transfer import apply_overrides

__all__ = ["PretrainConfig", "PretrainModelSection", "ConceptSection", "CaptionDataSection", "load_pretrain_config",
           "build_pretrainer", "install_per_parameter_clipping", "run_pretraining", "PRETRAIN_SOLVER"]
logger = logging.getLogger(__name__)

PRETRAIN_SOLVER = SolverConfig(ims_per_batch=96, base_lr=0.002, momentum=0.9, weight_decay=1e-4, warmup_iters=1000,
                               warmup_factor=0.001, steps=(300000, 525000), max_iter=600000)


@dataclass(frozen=True)
class PretrainModelSection:
    """Where the weights come from. ``clip_weights``: an OpenAI CLIP RN50/RN50x4 state dict (or a RegionCLIP
    checkpoint) -> student image tower and the text encoder; ``teacher_weights`` (default: the same file) -> the
    teacher; ``rpn_weights``: a detectron2 RPN checkpoint (e.g. ``rpn_lvis_866.pth``). Without weights the
    ``*_arch`` fields build random towers (tests); the teacher then starts as a copy of the student."""

    clip_weights: Optional[str] = None
    teacher_weights: Optional[str] = None
    rpn_weights: Optional[str] = None
    rpn_overrides: dict = field(default_factory=lambda: {"nms_thresh": 0.5, "post_nms_topk": 300})
    student_arch: Optional[ClipResNetConfig] = None
    teacher_arch: Optional[ClipResNetConfig] = None
    text_arch: Optional[ClipTextConfig] = None
    rpn_arch: Optional[RPNConfig] = None
    freeze_at: int = 2
    allow_jit: bool = False  # read OpenAI's TorchScript downloads (executes code stored in the file)


@dataclass(frozen=True)
class ConceptSection:
    """Concept pool: ``pool`` = a names file (one per line, from ``regionclip build-concepts``; embedded at start-up
    with the frozen text encoder, 81 templates) or an embedding file [C, D] (``regionclip embed-concepts``).
    ``teacher_pool``: embeddings for a teacher of another size (default: embedded with the teacher file's text
    encoder when ``pool`` is a names file, else the student's pool)."""

    pool: Optional[str] = None
    teacher_pool: Optional[str] = None
    templates: str = "regionclip"


@dataclass(frozen=True)
class CaptionDataSection:
    """Image-caption data: any mix of ``.jsonl`` (with ``image_root``), ``.tar`` shards (or folders of them) and
    image TSVs / folders of TSV pairs. Resize: shorter side ``min_size``, longer at most ``max_size``, bicubic."""

    paths: Tuple[str, ...] = ()
    image_root: Optional[str] = None
    min_size: int = 800
    max_size: int = 1333
    flip: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    concepts: ConceptSection = field(default_factory=ConceptSection)
    data: CaptionDataSection = field(default_factory=CaptionDataSection)
    pretrain: RegionTextConfig = field(default_factory=RegionTextConfig)
    solver: SolverConfig = field(default_factory=lambda: PRETRAIN_SOLVER)
    train: EngineConfig = field(default_factory=lambda: EngineConfig(output_dir="output/pretrain",
                                                                     checkpoint_period=10000, eval_period=0,
                                                                     eval_at_end=False))
    clip_grad_per_parameter: Optional[float] = 5.0  # CLIP_TYPE "norm", CLIP_VALUE 5.0 (per parameter tensor)


# ---------------------------------------------------------------------------------------------- config files
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_pretrain_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a recipe over the pretraining defaults (unknown keys raise ``ValueError``) and apply ``--set``."""

    data = read_yaml_mapping(path, "model/concepts/data/pretrain/solver/train") if path is not None else {}
    data = apply_overrides(data, overrides)
    defaults = to_dict(PretrainConfig())
    return from_dict(PretrainConfig, _merge(defaults, data))


# ---------------------------------------------------------------------------------------------- building
def _towers_from_file(path: str, allow_jit: bool) -> tuple[ModifiedResNet, Optional[CLIPTextTransformer]]:

    towers = load_clip_towers(resolve_weights(path), allow_jit=allow_jit)
    if towers.image is None:
        raise ValueError(f"{path} has no CLIP ResNet image tower (visual.* / backbone.*)")
    return towers.image, towers.text


def _detector(backbone: ModifiedResNet, rpn: Optional[nn.Module]) -> RegionCLIPDetector:

    # the pooler must be 2x the attnpool grid (14 RN50, 18 RN50x4)
    return RegionCLIPDetector(backbone, rpn, pooler_resolution=2 * backbone.attnpool.spacial_dim)


def _build_rpn(m: PretrainModelSection) -> nn.Module:

    overrides = dict(m.rpn_overrides)
    if m.rpn_weights is None:
        if m.rpn_arch is None:
            raise ValueError("pretraining needs the offline RPN: set model.rpn_weights (e.g. rpn_lvis_866.pth)")
        return build_offline_rpn(replace(m.rpn_arch, **overrides))
    sd, _ = rpn_state_dict_from_checkpoint(load_state_dict(resolve_weights(m.rpn_weights)))
    if not sd:
        raise ValueError(f"{m.rpn_weights} holds no detectron2 RPN weights (backbone.* / proposal_generator.*)")
    rpn = build_offline_rpn(infer_rpn_config(sd, **overrides))
    load_into(rpn, sd, strict=True, source=str(m.rpn_weights))
    return rpn


def _concept_pools(cfg: PretrainConfig, text: CLIPTextTransformer, teacher_text: Optional[CLIPTextTransformer], dim: int,
                   teacher_dim: int) -> tuple[Tensor, Optional[Tensor]]:

    c = cfg.concepts
    if c.pool is None:
        raise ValueError("concepts.pool is required: a names file (regionclip build-concepts) or an embedding file "
                         "(regionclip embed-concepts)")

    def resolve(name: str) -> Path:  # a path, or a released file name (coco_nouns_4764_emb)
        return Path(name) if Path(name).exists() or name.endswith(".txt") else resolve_weights(name)

    teacher = load_concept_embeddings(resolve(c.teacher_pool), expected_dim=teacher_dim) if c.teacher_pool else None
    pool_path = resolve(c.pool)
    if pool_path.suffix in (".pth", ".pt", ".safetensors"):
        pool = load_concept_embeddings(pool_path, expected_dim=dim)
    else:
        names = read_names_file(pool_path)
        logger.info("embedding %d concepts of %s with the text encoder (%s templates)", len(names), c.pool,
                    c.templates)
        pool = concept_embeddings(names, text, templates=c.templates)
        if teacher is None and teacher_text is not None:
            teacher = concept_embeddings(names, teacher_text, templates=c.templates)
    if teacher is None and teacher_dim != dim:
        raise ValueError(f"the teacher's embeddings are {teacher_dim}-d but the concept pool is {dim}-d: give "
                         "concepts.teacher_pool, or a names file with a teacher file that has a text encoder")
    return pool.cpu(), None if teacher is None else teacher.cpu()


def build_pretrainer(cfg: PretrainConfig, dist: Optional[DistInfo] = None) -> RegionTextPretrainer:
    """Student, teacher, text encoder, RPN and concept pools (computed on rank 0 and broadcast)."""

    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # identical random towers on every rank (random-init recipes)
    teacher_text = None
    if m.clip_weights is not None:
        student, text = _towers_from_file(m.clip_weights, m.allow_jit)
        if text is None:
            raise ValueError(f"{m.clip_weights} has no text encoder; pretraining needs one (an OpenAI CLIP file)")
        if m.teacher_weights is not None and m.teacher_weights != m.clip_weights:
            teacher, teacher_text = _towers_from_file(m.teacher_weights, m.allow_jit)
        else:
            teacher = copy.deepcopy(student)
    else:
        if m.student_arch is None or m.text_arch is None:
            raise ValueError("model: give clip_weights (an OpenAI CLIP file) or student_arch + text_arch")
        a = m.student_arch
        student = ModifiedResNet(a.layers, a.embed_dim, a.heads, a.image_resolution, a.width)
        text = build_text_encoder(m.text_arch)
        t = m.teacher_arch
        teacher = copy.deepcopy(student) if t is None or t == a else \
            ModifiedResNet(t.layers, t.embed_dim, t.heads, t.image_resolution, t.width)
    if m.teacher_weights is not None and m.clip_weights is None:
        teacher, teacher_text = _towers_from_file(m.teacher_weights, m.allow_jit)
    rpn = _build_rpn(m)
    is_main = dist is None or dist.is_main
    pools = _concept_pools(cfg, text, teacher_text, student.output_dim, teacher.output_dim) if is_main else None
    pool, teacher_pool = broadcast_object(pools)
    return RegionTextPretrainer(_detector(student, rpn), _detector(teacher, None), text, pool, teacher_pool,
                                cfg.pretrain, freeze_at=m.freeze_at)


def install_per_parameter_clipping(optimizer: torch.optim.Optimizer, max_norm: float) -> Any:
    """Clip every parameter's gradient to ``max_norm`` right before each ``optimizer.step`` (a step pre-hook;
    detectron2 wraps the optimizer's step the same way). ``GradScaler.step`` unscales before calling ``step``, so
    the clip sees true gradients under fp16 AMP too. Returns the hook handle."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        clip_grad_norm_per_parameter_(params, max_norm)

    return optimizer.register_step_pre_hook(clip)


def make_caption_batches(cfg: PretrainConfig, dist: DistInfo, context_length: int) -> Callable[[int], Any]:
    """``make(start_micro_batch)`` -> iterator of this rank's batches (deterministic order: exact resume)."""

    d, s = cfg.data, cfg.solver
    if not d.paths:
        raise ValueError("data.paths is empty: give caption data (.jsonl + image_root, .tar shards, image TSVs)")
    sources = [open_caption_source(p, d.image_root) for p in d.paths]
    dataset = CaptionDataset(sources[0] if len(sources) == 1 else ConcatCaptions(sources), d.min_size, d.max_size,
                             d.flip, context_length)
    per_rank, rest = divmod(s.ims_per_batch, dist.world_size * s.grad_accum)
    if rest or per_rank == 0:
        raise ValueError(f"solver.ims_per_batch={s.ims_per_batch} must be a multiple of processes x grad_accum "
                         f"= {dist.world_size} x {s.grad_accum}")
    logger.info("%d image-caption pairs, %d images per rank and micro-batch", len(dataset), per_rank)

    def make(start_micro: int) -> Any:
        sampler = TrainingSampler(len(dataset), cfg.train.seed, dist.rank, dist.world_size)
        batches = GroupedBatchSampler(sampler, per_rank, None, seed=cfg.train.seed, start_batch=start_micro)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=list,
                                             num_workers=cfg.train.num_workers,
                                             persistent_workers=cfg.train.num_workers > 0)
        return iter(loader)

    return make


def run_pretraining(cfg: PretrainConfig, *, resume: bool = False,
                    hooks: Sequence[Callable[[int, dict[str, float]], None]] = ()) -> dict[str, Any]:
    """Pretrain (on every ``torchrun`` rank, or a single process); returns rank 0's last logged metrics.

    Checkpoints ``<output_dir>/model_*.safetensors`` hold the original key layout (``backbone.*``,
    ``teacher_backbone.*``, ``lang_encoder.*``, ``offline_*``) and load with ``regionclip detect --weights``.
    """
    if cfg.clip_grad_per_parameter is not None and cfg.solver.clip_grad_norm is not None:
        raise ValueError("set either clip_grad_per_parameter (the original) or solver.clip_grad_norm (global), "
                         "not both")
    dist = init_distributed(cfg.train.device, cfg.train.backend)
    try:
        prepare_run_dir(cfg, cfg.train.output_dir, dist)
        task = build_pretrainer(cfg, dist)
        make = make_caption_batches(cfg, dist, task.text_encoder.context_length)
        trainer = Trainer(task, cfg.solver, cfg.train, dist, make, hooks=hooks)
        if cfg.clip_grad_per_parameter is not None:
            install_per_parameter_clipping(trainer.optimizer, cfg.clip_grad_per_parameter)
        last = trainer.train(resume=resume)
        return last if dist.is_main else {}  # only rank 0 reports (the CLI prints it)
    finally:
        cleanup()
