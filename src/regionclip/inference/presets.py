"""Named scenarios reproducing the original's README / script settings (docs/DESIGN.md#settings), and the one
place where a preset, the checkpoint kind and explicit flags are resolved into the settings a model runs with.

A preset fixes the region source, the RPN overrides, the default vocabulary and the default post-processing, so a
user picks ``--preset lvis-rpn`` instead of ten config overrides. Explicit load arguments (:class:`LoadOptions`)
override a preset's load-time choices; post-processing is a per-call choice
(:class:`regionclip.pipeline.RunOptions`) that starts from the preset's (``Settings.postprocess``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..config import PostprocessConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    regions: str  # "rpn" or "gt" (boxes given by the dataset / user)
    vocabulary: str  # built-in vocabulary name (regionclip.assets.vocabulary)
    postprocess: PostprocessConfig
    rpn_overrides: dict[str, Any] = field(default_factory=dict)  # RPNConfig fields (e.g. nms_thresh)
    weights: str = "regionclip_pretrained-cc_rn50"
    rpn_weights: Optional[str] = None
    class_embeddings_file: Optional[str] = None  # released embedding file matching the vocabulary
    reported: str = ""  # what the paper / model zoo reports for this scenario


ZS_RPN = {"nms_thresh": 0.9, "post_nms_topk": 1000}  # OFFLINE_RPN_NMS_THRESH 0.9 in every zero-shot config

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("coco-gt", "COCO zero-shot with ground-truth boxes (README, paper Table 4)", "gt", "coco65",
           PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100),
           class_embeddings_file="coco_65_cls_emb"),
    Preset("coco-rpn", "COCO zero-shot with LVIS-866 RPN proposals", "rpn", "coco65",
           PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, rpn_score="raw"),
           rpn_overrides=ZS_RPN, rpn_weights="rpn_lvis_866", class_embeddings_file="coco_65_cls_emb"),
    Preset("lvis-gt", "LVIS zero-shot with ground-truth boxes (≤500 per image)", "gt", "lvis1203",
           PostprocessConfig(score_thresh=0.0001, nms_thresh=0.5, detections_per_image=300),
           class_embeddings_file="lvis_1203_cls_emb"),
    Preset("lvis-rpn", "LVIS zero-shot with LVIS-866 RPN proposals", "rpn", "lvis1203",
           PostprocessConfig(score_thresh=0.02, nms_thresh=0.5, detections_per_image=300, rpn_score="raw"),
           rpn_overrides=ZS_RPN, rpn_weights="rpn_lvis_866", class_embeddings_file="lvis_1203_cls_emb"),
    Preset("custom", "README demo on your own images: RN50x4, LVIS-1203 names, NMS 0.3, reported scores = class "
           "probabilities (MODEL.CLIP.VIS True)", "rpn", "lvis1203",
           PostprocessConfig(score_thresh=0.02, nms_thresh=0.3, detections_per_image=300, rpn_score="raw",
                             report_unmultiplied_scores=True),
           rpn_overrides=ZS_RPN, weights="regionclip_pretrained-cc_rn50x4", class_embeddings_file="lvis_1203_cls_emb_rn50x4"),
    Preset("coco-ovd", "Open-vocabulary COCO with the fine-tuned detector (48 base -> 65), soft-NMS, box regression",
           "rpn", "coco65",
           PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, soft_nms="gaussian",
                             apply_box_deltas=True),
           rpn_overrides={"nms_thresh": 0.7, "post_nms_topk": 1000}, weights="regionclip_finetuned-coco_rn50",
           rpn_weights="rpn_coco_48", class_embeddings_file="coco_65_cls_emb",
           reported="RN50: AP50 novel 31.4 / all 50.4 (MODEL_ZOO)"),
    Preset("lvis-ovd", "Open-vocabulary LVIS with the fine-tuned detector (866 base -> 1203), soft-NMS, box "
           "regression, RPN score multiplication, class-agnostic masks", "rpn", "lvis1203",
           PostprocessConfig(score_thresh=0.02, nms_thresh=0.5, detections_per_image=300, soft_nms="gaussian",
                             apply_box_deltas=True, rpn_score="raw"),
           rpn_overrides={"nms_thresh": 0.7, "post_nms_topk": 1000}, weights="regionclip_finetuned-lvis_rn50x4",
           rpn_weights="rpn_lvis_866_lsj", class_embeddings_file="lvis_1203_cls_emb_rn50x4",
           reported="RN50x4: box APr 22.0 / AP 32.3 (MODEL_ZOO)"),
]}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# Without a preset, a checkpoint runs with the original's scenario for its kind (docs/DESIGN.md#settings):
# pretrained -> the zero-shot RPN settings (LVIS thresholds, NMS 0.9 / 1000 proposals, raw-logit multiplication);
# fine-tuned COCO / LVIS -> that transfer model's test settings; transformer -> the zero-shot branch's evaluation.
KIND_PRESETS = {"pretrained": "lvis-rpn", "finetuned-coco": "coco-ovd", "finetuned-lvis": "lvis-ovd"}
TRANSFORMER_DEFAULT = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100)


def refuse_postprocess_at_load(names: Any, where: str) -> None:
    """Post-processing is chosen per call, never at load time (docs/DESIGN.md#settings): a TypeError saying so."""
    post = sorted(set(names) & (set(PostprocessConfig.__dataclass_fields__) | {"postprocess"}))
    if post:
        example = ", ".join(f"{k}=..." for k in post if k != "postprocess") or "score_thresh=..."
        raise TypeError(f"{where} got post-processing option(s) {post}: post-processing is chosen per call, not at "
                        f"load time; pass it to the call (model.detect(images, {example})) or build the options "
                        f"once (model.run_options({example}))")


@dataclass(frozen=True)
class LoadOptions:
    """Everything a user chooses when loading a model (API keywords or CLI flags), before resolution: load-time
    choices only (files, preset, regions, device, fusion, strictness, RPN and transformer build options, the
    backend). Per-call choices (batch, dtype, chunk, post-processing) are :class:`regionclip.pipeline.RunOptions`.

    ``rpn`` / ``transformer`` / ``backend_options`` hold only the fields the user set explicitly, as sorted
    ``(name, value)`` pairs (hashable: a frozen record of the request). :func:`resolve_settings` turns this plus
    the checkpoint's kind into :class:`Settings` exactly once.
    """

    weights: Optional[str] = None  # None: the preset's, else regionclip_pretrained-cc_rn50
    rpn_weights: Optional[str] = None  # None: the preset's RPN file (if the preset uses RPN regions)
    preset: Optional[str] = None
    device: str = "cpu"
    strict: bool = True
    strict_hash: bool = False  # a weight file whose sha256 differs from the expected one: error instead of warning
    regions: Optional[str] = None  # "rpn" or "gt"; None: the preset's, else "rpn" when the model has an RPN
    fuse: bool = True  # fold frozen BNs / the attnpool K,V projections at load time (inference only; exact)
    # the graphs the model runs on (regionclip.export.make_backend): "torch" = the loaded modules themselves;
    # onnxruntime / openvino / torch-export run the graphs `regionclip export` wrote to export_dir
    backend: str = "torch"
    export_dir: Optional[str] = None
    backend_options: tuple[tuple[str, Any], ...] = ()  # make_backend keywords: int8, providers, threads, verify
    rpn: tuple[tuple[str, Any], ...] = ()
    transformer: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.preset is not None:
            get_preset(self.preset)  # an unknown preset is an error before anything is loaded
        if self.regions not in (None, "rpn", "gt"):
            raise ValueError(f"regions must be 'rpn' or 'gt', got {self.regions!r}")

    @classmethod
    def create(cls, weights: Any = None, rpn_weights: Any = None, *, rpn: Optional[dict[str, Any]] = None,
               transformer: Optional[dict[str, Any]] = None, export_dir: Any = None,
               backend_options: Optional[dict[str, Any]] = None, **kwargs: Any) -> "LoadOptions":
        """Build from plain values (paths become strings, dicts become sorted pairs; ``None`` values dropped)."""
        refuse_postprocess_at_load(kwargs, "LoadOptions.create")

        def pairs(d: Optional[dict[str, Any]]) -> tuple[tuple[str, Any], ...]:
            return tuple(sorted((k, v) for k, v in (d or {}).items() if v is not None))

        def path(p: Any) -> Optional[str]:
            return None if p is None else str(p)

        return cls(weights=path(weights), rpn_weights=path(rpn_weights), rpn=pairs(rpn),
                   transformer=pairs(transformer), export_dir=path(export_dir),
                   backend_options=pairs(backend_options), **kwargs)

    @property
    def preset_obj(self) -> Optional[Preset]:
        return get_preset(self.preset) if self.preset else None

    def weights_name(self) -> str:
        p = self.preset_obj
        return self.weights or (p.weights if p else "regionclip_pretrained-cc_rn50")

    def rpn_weights_name(self) -> Optional[str]:
        """The RPN file to load: the user's, else the preset's when the preset's own weights are used."""
        if self.rpn_weights is not None or self.regions == "gt":
            return self.rpn_weights
        p = self.preset_obj
        return p.rpn_weights if p is not None and p.regions == "rpn" and self.weights is None else None


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one loaded model.

    ``postprocess`` is the *default per-call post-processing*: the preset's (or the checkpoint kind's), the base
    that every :class:`regionclip.pipeline.RunOptions` of this model starts from (``RegionCLIP.run_options``).
    Nothing at load time changes it; a call's own values (``score_thresh=...``, ``--score-thresh``) live in that
    call's RunOptions only.
    """

    kind: str
    preset: Optional[str]  # the preset given, or the one chosen for the checkpoint kind
    regions: str  # "rpn" or "gt"
    vocabulary: str  # default vocabulary (built-in name)
    postprocess: PostprocessConfig  # default per-call post-processing (see above)
    rpn: tuple[tuple[str, Any], ...]  # RPNConfig fields applied when building the RPN
    class_embeddings_file: Optional[str] = None  # released embedding file of the default vocabulary

    def describe(self, postprocess: Optional[PostprocessConfig] = None) -> str:
        """One line for logs / the CLI: where the settings came from and what they are. ``postprocess``: what a
        run actually uses (its ``RunOptions.postprocess``); default this model's per-call default."""
        pp = postprocess if postprocess is not None else self.postprocess
        rpn = ", ".join(f"{k}={v}" for k, v in self.rpn) or "file defaults"
        post = (f"score>{pp.score_thresh}, {'soft-NMS ' + pp.soft_nms if pp.soft_nms else 'NMS'} {pp.nms_thresh}, "
                f"{pp.detections_per_image}/image, rpn_score={pp.rpn_score}"
                + (", box deltas" if pp.apply_box_deltas else "")
                + (", reported=class prob" if pp.report_unmultiplied_scores else ""))
        return (f"settings: {self.kind} checkpoint, preset {self.preset or 'none'}, regions={self.regions}"
                + (f" (RPN {rpn})" if self.regions == "rpn" else "") + f"; {post}")


def resolve_settings(kind: str, options: LoadOptions) -> Settings:
    """Preset (given, or the one of the checkpoint kind) + explicit load options -> :class:`Settings`, once."""
    given = options.preset_obj
    name = options.preset or KIND_PRESETS.get(kind)
    p = given or (get_preset(name) if name else None)
    post = p.postprocess if p else TRANSFORMER_DEFAULT
    regions = options.regions or (given.regions if given is not None else "rpn")  # p is given when given
    rpn = dict(p.rpn_overrides) if p else {}
    rpn.update(dict(options.rpn))
    if regions == "gt" and post.rpn_score != "none":
        post = replace(post, rpn_score="none")  # given boxes have no objectness (the original can't do it either)
    return Settings(kind=kind, preset=name, regions=regions, vocabulary=p.vocabulary if p else "lvis1203",
                    postprocess=post, rpn=tuple(sorted(rpn.items())), class_embeddings_file=p.class_embeddings_file if p else None)
