"""High-level Python API: load once, set a vocabulary, detect on many images.

>>> from regionclip import RegionCLIP
>>> model = RegionCLIP.from_pretrained("regionclip_pretrained-cc_rn50x4", preset="custom")
>>> model.set_vocabulary(["car", "traffic cone", "forklift"])
>>> dets = model.detect(["street.jpg"])[0]      # Detections: boxes XYXY (original pixels), scores, labels, names
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoint.io import read_weight_file
from .checkpoint.regionclip import class_embedding_file
from .config import PostprocessConfig
from .data.images import ImageInput
from .factory import LoadedCheckpoint, load_detector
from .modeling.detector import RegionCLIPDetector
from .presets import Preset, get_preset
from .pretrained import resolve_weights
from .structures import Detections

PathLike = Union[str, os.PathLike]


def parse_names(vocab: Union[str, Sequence[str]]) -> list[str]:
    """``"car,traffic cone"``, a text file (one name per line), a built-in name (coco65, lvis1203, ...) or a list.

    Delegates to :func:`regionclip.text.vocabulary.parse_vocabulary` (strings) and
    :func:`regionclip.text.prompts.validate_names` (lists): empty names are errors naming their position,
    duplicates warn and are kept (row i stays class i).
    """
    from .text.prompts import validate_names
    from .text.vocabulary import parse_vocabulary

    if isinstance(vocab, str):
        return parse_vocabulary(vocab)
    names = validate_names([str(v).strip() for v in vocab], source="vocabulary")
    if not names:
        raise ValueError("empty vocabulary: give at least one class name")
    return names


class RegionCLIP:
    """A loaded detector plus its vocabulary. Thread-compatible for inference (no per-call state)."""

    def __init__(self, detector: RegionCLIPDetector, weights_path: Optional[Path] = None,
                 loaded: Optional[LoadedCheckpoint] = None, preset: Optional[Preset] = None,
                 transformer_options: Optional[dict[str, Any]] = None) -> None:
        self.detector = detector
        self.transformer_options = transformer_options
        self.weights_path = weights_path
        self.loaded = loaded
        self.preset = preset

    @classmethod
    def from_pretrained(cls, weights: PathLike = "regionclip_pretrained-cc_rn50", rpn_weights: Optional[PathLike] = None,
                        *, preset: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                        postprocess: Optional[PostprocessConfig] = None, rpn_overrides: Optional[dict] = None,
                        strict: bool = True, region_chunk_size: int = 256,
                        transformer_options: Optional[dict[str, Any]] = None, **postprocess_overrides: Any
                        ) -> "RegionCLIP":
        """Load a RegionCLIP checkpoint (name from :data:`regionclip.pretrained.WEIGHTS` or a path) and an optional
        RPN file. ``preset`` (see :mod:`regionclip.presets`) sets post-processing and RPN overrides; keyword
        ``postprocess_overrides`` (e.g. ``score_thresh=0.1``) replace single fields."""
        p = get_preset(preset) if preset else None
        pp = postprocess or (p.postprocess if p else None)  # None: load_detector picks by checkpoint kind
        rpn_ov = dict(p.rpn_overrides) if p else {}
        rpn_ov.update(rpn_overrides or {})
        wpath = resolve_weights(weights)
        rpath = resolve_weights(rpn_weights) if rpn_weights is not None else None
        use_rpn = not (p is not None and p.regions == "gt" and rpath is None)
        det, loaded = load_detector(wpath, rpath, postprocess=pp, rpn_overrides=rpn_ov, use_rpn=use_rpn,
                                    strict=strict, device=device, region_chunk_size=region_chunk_size,
                                    transformer_options=transformer_options)
        if postprocess_overrides:
            det.postprocess_cfg = replace(det.postprocess_cfg, **postprocess_overrides)
        return cls(det, wpath, loaded, p, transformer_options)

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, vocab: Union[str, Sequence[str], None] = None,
                       concept_embeddings: Union[PathLike, Tensor, None] = None, *,
                       cache_dir: Optional[PathLike] = None, show_progress: bool = False) -> list[str]:
        """Set the classes. Either a concept-embedding file/tensor (rows = classes; names from ``vocab`` or
        numbered), or names whose embeddings are computed once with this checkpoint's own text encoder (81
        prompt templates) and cached on disk. Returns the class names."""
        if vocab is None and concept_embeddings is None and self.preset is not None:
            vocab = self.preset.vocabulary
        names = parse_names(vocab) if vocab is not None else None
        if concept_embeddings is not None:
            src = str(concept_embeddings) if not isinstance(concept_embeddings, Tensor) else "concept embeddings"
            emb = concept_embeddings if isinstance(concept_embeddings, Tensor) else \
                class_embedding_file(read_weight_file(concept_embeddings), src)
            if emb.ndim == 1:
                emb = emb[None]
            if names is None:
                names = [str(i) for i in range(emb.shape[0])]
            if len(names) != emb.shape[0]:
                raise ValueError(f"{src} has {emb.shape[0]} rows but the vocabulary has {len(names)} names; row i must "
                                 "be the embedding of name i (e.g. lvis_1203_cls_emb.pth goes with --vocab lvis1203)")
            self.detector.set_vocabulary(emb, names, source=f"{src} (for model {self.weights_path})")
            return names
        if names is None:
            raise ValueError("give a vocabulary (names) or a concept-embedding file")
        emb = self.embed_names(names, cache_dir=cache_dir, show_progress=show_progress)
        self.detector.set_vocabulary(emb, names, source=f"text embeddings of {self.weights_path}")
        return names

    def embed_names(self, names: Sequence[str], *, cache_dir: Optional[PathLike] = None,
                    show_progress: bool = False) -> Tensor:
        """[K, D] class embeddings of ``names`` with this checkpoint's own text tower: the 81-template RegionCLIP
        procedure (cached on disk) for ResNet checkpoints, the zero-shot branch's 2-template normalised
        procedure for transformer checkpoints. Does not change the model's vocabulary."""
        if hasattr(self.detector, "encode_class_names"):  # transformer path: the text tower came with the weights
            if self.weights_path is None:
                return self.detector.encode_class_names(list(names))
            import json

            from .text.vocabulary import cached_name_embeddings, checkpoint_fingerprint, default_cache_dir

            # keyed by the file and by the options its shapes cannot tell (they change the text tower's output)
            opts = json.dumps(self.transformer_options or {}, sort_keys=True)
            key = hashlib.sha256(f"zeroshot-branch|{opts}".encode()).hexdigest()[:16]
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            cache_file = root / f"{checkpoint_fingerprint(self.weights_path)[:24]}_{key}.safetensors"
            return cached_name_embeddings(list(names), cache_file, self.detector.encode_class_names).to(
                self.detector.device)
        if self.weights_path is None:
            raise ValueError("computing embeddings from names needs the checkpoint's text encoder (weights path); "
                             "pass class embeddings instead")
        from .text.vocabulary import class_embeddings

        return class_embeddings(list(names), self.weights_path, cache_dir=cache_dir, device=self.detector.device,
                                show_progress=show_progress)

    @property
    def class_names(self) -> list[str]:
        return list(self.detector.class_names)

    # ------------------------------------------------------------------ inference
    def detect(self, images: Sequence[ImageInput], boxes: Optional[Sequence[Any]] = None, *, batch_size: int = 1,
               **kwargs: Any) -> list[Detections]:
        """Detect on images (paths / PIL / arrays / uint8 tensors). ``boxes``: per-image user boxes (XYXY,
        original pixels) to classify instead of RPN proposals."""
        return list(self.iter_detect(images, boxes, batch_size=batch_size, **kwargs))

    def iter_detect(self, images: Sequence[ImageInput], boxes: Optional[Sequence[Any]] = None, *,
                    batch_size: int = 1, **kwargs: Any) -> Iterator[Detections]:
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
        for s in range(0, len(images), batch_size):
            bx = boxes[s:s + batch_size] if boxes is not None else None
            for j, d in enumerate(self.detector.detect(images[s:s + batch_size], bx, **kwargs)):
                im = images[s + j]
                if isinstance(im, (str, os.PathLike)):
                    d.file_name = str(im)
                yield d

    __call__ = detect
