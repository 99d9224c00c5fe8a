"""High-level Python API: load once, set a vocabulary, detect on many images.

>>> from regionclip import RegionCLIP
>>> model = RegionCLIP.from_pretrained("regionclip_pretrained-cc_rn50x4", preset="custom")
>>> model.set_vocabulary(["car", "traffic cone", "forklift"])
>>> dets = model.detect(["street.jpg"])[0]      # Detections: boxes XYXY (original pixels), scores, labels, names

``RegionCLIP`` is a thin front door: loading goes through :mod:`regionclip.factory` with settings resolved once by
:func:`regionclip.inference.presets.resolve_settings`, and inference through :class:`regionclip.pipeline.Pipeline`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .config import InputConfig
from .data.images import ImageInput
from .data.loader import InferenceItem
from .export import make_backend
from .factory import LoadedCheckpoint, checkpoint_kind, load_detector, load_text_tower, read_checkpoint
from .inference.presets import LoadOptions, Settings, refuse_postprocess_at_load, resolve_settings
from .modeling.fusion import fused_for_inference
from .modeling.recognizer import RegionRecognizer
from .pipeline import ImageResult, Pipeline, RunOptions
from .structures import Detections
from .text.name_cache import class_embeddings
from .text.vocabulary import (  # noqa: F401  (is_embedding_file: re-exported for older imports)
    Vocabulary,
    VocabularyArg,
    VocabularyLike,
    is_embedding_file,
    resolve_names,
    resolve_vocabulary,
)
from .weights.pretrained import WeightsNotFound, resolve_weights

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


def parse_names(vocab: VocabularyArg) -> list[str]:
    """Class names of a vocabulary argument (see :func:`regionclip.text.vocabulary.resolve_names`)."""
    return resolve_names(vocab)[0]


class RegionCLIP:
    """A loaded model, the settings it was loaded with, its pipeline and its current vocabulary.

    Thread-compatible for inference: a call never changes the model; :meth:`set_vocabulary` is the only state
    change (per-request vocabularies go to :meth:`detect` as ``vocabulary=``).
    """

    def __init__(self, detector: RegionRecognizer, loaded: LoadedCheckpoint, settings: Settings,
                 options: LoadOptions = LoadOptions(), input_cfg: InputConfig = InputConfig()) -> None:
        self.detector = detector
        self.loaded = loaded
        self.settings = settings
        self.options = options
        self.pipeline = Pipeline(detector, input_cfg)
        self.vocabulary: Optional[Vocabulary] = None
        if loaded.class_embeddings is not None:  # fine-tuned files carry their (test) class embeddings
            self.vocabulary = self._embedded_vocabulary(loaded.class_embeddings)

    @property
    def weights_path(self) -> Optional[Path]:
        return self.loaded.weights

    @property
    def class_names(self) -> list[str]:
        return list(self.vocabulary.names) if self.vocabulary is not None else []

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, weights: Optional[PathLike] = None, rpn_weights: Optional[PathLike] = None, *,
                        preset: Optional[str] = None, device: Union[str, torch.device] = "cpu", strict: bool = True,
                        regions: Optional[str] = None, rpn_overrides: Optional[dict[str, Any]] = None,
                        transformer_options: Optional[dict[str, Any]] = None, fuse: bool = True,
                        strict_hash: bool = False, backend: str = "torch", export_dir: Optional[PathLike] = None,
                        backend_options: Optional[dict[str, Any]] = None, **unexpected: Any) -> "RegionCLIP":
        """Load a RegionCLIP checkpoint (a name from :data:`regionclip.weights.pretrained.WEIGHTS` or a path) and an optional
        RPN file. ``preset`` (see :mod:`regionclip.inference.presets`) picks one of the original's scenarios; without one the
        checkpoint kind picks it (docs/DESIGN.md#settings). Load-time choices only: post-processing is per call
        (``model.detect(images, score_thresh=0.1)``, :meth:`run_options`); a post-processing keyword here is a
        TypeError saying so. ``fuse``: fold the frozen BatchNorms and the attention pool's K/V projections for
        inference (docs/DESIGN.md#cpu-speed; exact up to float rounding; the loaded model then cannot be trained or
        saved). ``backend`` / ``export_dir`` / ``backend_options``: run on the graphs ``regionclip export`` wrote
        (:meth:`with_backend`)."""
        refuse_postprocess_at_load(unexpected, "RegionCLIP.from_pretrained")
        if unexpected:
            raise TypeError(f"RegionCLIP.from_pretrained got unexpected keyword argument(s) {sorted(unexpected)}")
        return cls.load(LoadOptions.create(weights, rpn_weights, preset=preset, device=str(device), strict=strict,
                                           regions=regions, rpn=rpn_overrides, transformer=transformer_options,
                                           fuse=fuse, strict_hash=strict_hash, backend=backend,
                                           export_dir=export_dir, backend_options=backend_options))

    @classmethod
    def load(cls, options: LoadOptions) -> "RegionCLIP":
        """The one loading path: resolve the files, read the checkpoint kind, resolve the settings once, build."""
        wpath = resolve_weights(options.weights_name(), strict_hash=options.strict_hash)
        sd = read_checkpoint(wpath)
        settings = resolve_settings(checkpoint_kind(sd), options)
        rpn_name = options.rpn_weights_name()
        rpath = resolve_weights(rpn_name, strict_hash=options.strict_hash) \
            if rpn_name is not None and settings.regions == "rpn" else None
        det, loaded = load_detector(sd, rpath, rpn_overrides=dict(settings.rpn), use_rpn=settings.regions == "rpn",
                                    strict=options.strict, device=options.device,
                                    transformer_options=dict(options.transformer) or None)
        loaded.weights = wpath
        loaded.report.source = loaded.report.source.replace("<state dict>", str(wpath))
        if options.fuse:  # keep only the inference copy: the loaded module is dropped here (no lasting 2x memory)
            det = fused_for_inference(det)
        input_cfg = loaded.config.input if loaded.config is not None else InputConfig()
        model = cls(det, loaded, settings, options, input_cfg)
        if options.backend == "torch" and not options.backend_options:
            return model
        return model.with_backend(options.backend, options.export_dir, **dict(options.backend_options))

    # ------------------------------------------------------------------ vocabulary
    def make_vocabulary(self, vocab: VocabularyLike = None,
                        class_embeddings: Union[PathLike, Tensor, None] = None, *,
                        cache_dir: Optional[PathLike] = None, show_progress: bool = False) -> Vocabulary:
        """A validated :class:`Vocabulary` (nothing stored), through the one resolver
        :func:`regionclip.text.vocabulary.resolve_vocabulary`. Either class embeddings (a file or a [K, D] tensor; names
        from ``vocab`` or numbered) or names, embedded once with this checkpoint's own text encoder and cached on
        disk. With neither, the settings' default vocabulary (and its released embedding file, when it is in the
        weights folder and the preset's own weights are used)."""
        return resolve_vocabulary(
            vocab, class_embeddings, embed_dim=self.detector.embed_dim, model_name=str(self.weights_path),
            embed_names=lambda names: self.embed_names(names, cache_dir=cache_dir, show_progress=show_progress),
            default_vocab=self.settings.vocabulary, default_embeddings=self._default_embedding_file)

    def set_vocabulary(self, vocab: Optional[VocabularyArg] = None,
                       class_embeddings: Union[PathLike, Tensor, None] = None, *,
                       cache_dir: Optional[PathLike] = None, show_progress: bool = False) -> list[str]:
        """Set the classes used when :meth:`detect` gets no ``vocabulary``; returns the class names."""
        self.vocabulary = self.make_vocabulary(vocab, class_embeddings, cache_dir=cache_dir,
                                               show_progress=show_progress)
        return list(self.vocabulary.names)

    def embed_names(self, names: Sequence[str], *, cache_dir: Optional[PathLike] = None,
                    show_progress: bool = False) -> Tensor:
        """[K, D] class embeddings of ``names`` with this checkpoint's own text tower: the 81-template RegionCLIP
        procedure for CLIP-ResNet checkpoints, the zero-shot branch's 2-template normalised procedure for
        transformer checkpoints; both cached on disk per name. Does not change the model's vocabulary."""
        if self.weights_path is None:
            raise ValueError("computing embeddings from names needs the checkpoint's text encoder (weights path); "
                             "pass class embeddings instead")
        path, device, opts = self.weights_path, self.detector.device, dict(self.options.transformer)
        # the factory builds the text tower from the file, only when a name is not cached yet
        return class_embeddings(list(names), path,
                                lambda: load_text_tower(path, device=device, transformer_options=opts or None),
                                procedure=self.loaded.text_procedure, tower_options=opts, cache_dir=cache_dir,
                                device=device, show_progress=show_progress)

    def _default_embedding_file(self) -> Optional[str]:
        """The preset's released embedding file when the user has it locally (else names are embedded)."""
        s = self.settings
        if not s.class_embeddings_file or self.options.weights is not None or self.options.preset is None:
            return None
        try:
            return str(resolve_weights(s.class_embeddings_file, download=False))
        except WeightsNotFound:
            return None

    def _embedded_vocabulary(self, emb: Tensor) -> Vocabulary:
        return resolve_vocabulary(None, emb, embed_dim=self.detector.embed_dim, default_vocab=self.settings.vocabulary,
                                  source=f"{self.weights_path} (roi_heads.box_predictor embeddings)")

    # ------------------------------------------------------------------ inference
    def run_options(self, **overrides: Any) -> RunOptions:
        """:class:`RunOptions` from this model's default per-call post-processing (``settings.postprocess``) plus
        per-call overrides by field name (``batch_size``, ``dtype``, ``chunk_size``, ``score_thresh``, ...;
        :meth:`RunOptions.create`). The defaults are :class:`RunOptions`' own, defined once there. The one place a
        call's settings are made: the CLI's ``--score-thresh`` etc. come here too (``cli.common.run_options``)."""
        opts = RunOptions.create(self.settings.postprocess, **overrides)
        if self.settings.regions == "gt" and opts.postprocess.rpn_score != "none":
            # given boxes have no objectness: what the pipeline applies in GT mode, recorded in the options it ran
            opts = opts.override(rpn_score="none")
        return opts

    def require_vocabulary(self, vocabulary: Optional[Vocabulary] = None) -> Vocabulary:
        v = vocabulary or self.vocabulary
        if v is None:
            raise ValueError("no vocabulary set: call set_vocabulary(['cat', 'dog']) (CLI: --vocab 'cat,dog' or "
                             "--concept-emb file.pth)")
        return v

    def detect(self, images: Sequence[ImageInput], boxes: Optional[Sequence[Any]] = None, *,
               vocabulary: Optional[Vocabulary] = None, options: Optional[RunOptions] = None, **kwargs: Any
               ) -> list[Detections]:
        """Detect on images (paths / PIL / arrays / uint8 tensors). ``boxes``: per-image user boxes (XYXY, original
        pixels) to classify instead of RPN proposals. ``kwargs`` go to :meth:`run_options` (``batch_size``,
        ``dtype``, ``chunk_size``, post-processing fields ...)."""
        opts = options or self.run_options(**kwargs)
        dets = self.pipeline.detect(images, self.require_vocabulary(vocabulary), opts, boxes=boxes)
        for im, d in zip(images, dets):
            if isinstance(im, (str, os.PathLike)):
                d.file_name = str(im)
        return dets

    def run(self, items: Sequence[InferenceItem], options: Optional[RunOptions] = None, *,
            vocabulary: Optional[Vocabulary] = None, boxes_source: str = "") -> Iterator[ImageResult]:
        """Stream many images (see :meth:`regionclip.pipeline.Pipeline.run`): one result or error per item.
        ``boxes_source``: the file the items' boxes came from (named in bad-box errors)."""
        return self.pipeline.run(items, self.require_vocabulary(vocabulary), options or self.run_options(),
                                 boxes_source=boxes_source)

    def with_backend(self, backend: str, export_dir: Optional[PathLike] = None, **backend_options: Any
                     ) -> "RegionCLIP":
        """A new :class:`RegionCLIP` (same settings, weights and vocabulary) whose pipeline runs on ``backend``:
        ``torch`` (this model), or ``onnxruntime`` / ``openvino`` / ``torch-export`` over the graphs that
        ``regionclip export`` wrote to ``export_dir``; ``backend_options``: ``int8``, ``providers``, ``threads``,
        ``verify`` (:func:`regionclip.export.make_backend`). This model is not changed."""
        other = RegionCLIP(make_backend(self, backend, export_dir, **backend_options), self.loaded, self.settings,
                           self.options, self.pipeline.input_cfg)
        other.vocabulary = self.vocabulary
        return other

    __call__ = detect
