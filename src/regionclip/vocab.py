"""Vocabularies: what the user asks for -> ``(names, category ids)``, and the validated [K, D] class embeddings.

There is one resolver (:func:`resolve_names`) for every way of naming classes (a built-in name with any alias,
a text file, a comma list, a Python list) and one validated container (:class:`Vocabulary`) that the pipeline
classifies against. "Class embeddings" is the one name for the [K, D] text embeddings across the package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .assets import BUILTIN_VOCABULARIES, builtin_name, builtin_vocabulary
from .text.prompts import validate_names
from .text.vocabulary import parse_vocabulary

VocabularyArg = Union[str, os.PathLike, Sequence[str]]


def resolve_names(vocab: VocabularyArg) -> tuple[list[str], list[int]]:
    """(names, category ids) for a vocabulary argument.

    Built-in names (``coco65``/``coco``, ``coco48``, ``coco17``, ``lvis1203``/``lvis``, ``lvis866``; any case, '-' or
    '_') get their dataset's category ids (COCO ids, LVIS ids); any other list gets ``index + 1`` (the LVIS
    convention of the original's results files). A string is a built-in name, a text file (one name per line) or
    a comma-separated list; a sequence is taken as the names.

    Raises:
        ValueError: empty vocabulary, empty names (position given), a bad names file.
        FileNotFoundError: a path-like argument that does not exist.
    """
    if isinstance(vocab, (str, os.PathLike)):
        arg = os.fspath(vocab)
        key = builtin_name(arg) if arg.strip() else None
        if key is not None:
            return builtin_vocabulary(key)
        names = parse_vocabulary(arg)
    else:
        names = validate_names([str(v).strip() for v in vocab], source="vocabulary")
        if not names:
            raise ValueError("empty vocabulary: give at least one class name, e.g. ['car', 'traffic cone'], or one "
                             "of " + ", ".join(BUILTIN_VOCABULARIES))
    return names, list(range(1, len(names) + 1))


def is_builtin_vocabulary(vocab: VocabularyArg) -> bool:
    """Whether ``vocab`` names a built-in vocabulary (``coco65``, ``lvis``, ...)."""
    if not isinstance(vocab, (str, os.PathLike)):
        return False
    arg = os.fspath(vocab)
    return isinstance(arg, str) and bool(arg.strip()) and builtin_name(arg) is not None


def check_class_embeddings(emb: Tensor, *, embed_dim: Optional[int] = None, source: str = "class embeddings"
                           ) -> Tensor:
    """Validate [K, D] class embeddings and return them as float32 [K, D] (a 1-concept [D] file becomes [1, D]).

    Raises ``ValueError`` naming ``source`` and the offending rows for: not 2-D, no rows, NaN/inf rows, all-zero
    rows (a zero row has no direction: every cosine with it is 0, so it silently scores as nothing), and a width
    other than ``embed_dim`` (embeddings of another CLIP model).
    """
    t = torch.as_tensor(emb).detach()
    if not t.is_floating_point():
        raise ValueError(f"{source}: class embeddings must be floating point, got {t.dtype}")
    t = t.float()
    if t.ndim == 1:  # the original's extraction squeezed a 1-concept file to [D]
        t = t[None]
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{source}: expected a non-empty [K, D] tensor of class embeddings, got shape "
                         f"{tuple(t.shape)}")
    if embed_dim is not None and t.shape[1] != embed_dim:
        raise ValueError(f"{source} are {t.shape[1]}-d but this model's region embeddings are {embed_dim}-d; use "
                         "embeddings made with the same CLIP model (1024-d = RN50, 640-d = RN50x4)")
    bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{source}: {len(bad)} row(s) hold NaN or inf (rows {bad[:10]}); the file is corrupt or was "
                         "computed in a precision that overflowed - recompute it (regionclip embed-concepts)")
    zero = (t.abs().sum(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"{source}: {len(zero)} row(s) are all zeros (rows {zero[:10]}); a zero embedding has no "
                         "direction and can never be detected - recompute it or drop that class")
    return t


@dataclass(frozen=True)
class Vocabulary:
    """K classes: names, dataset category ids and validated [K, D] float32 class embeddings (row i = class i)."""

    names: tuple[str, ...]
    class_embeddings: Tensor
    category_ids: tuple[int, ...]
    source: str = "class embeddings"

    @classmethod
    def create(cls, class_embeddings: Tensor, names: Optional[Sequence[str]] = None,
               category_ids: Optional[Sequence[int]] = None, *, embed_dim: Optional[int] = None,
               source: str = "class embeddings") -> "Vocabulary":
        """Validate and build. ``names`` default ``"0".."K-1"``, ``category_ids`` default ``index + 1``."""
        emb = check_class_embeddings(class_embeddings, embed_dim=embed_dim, source=source)
        k = emb.shape[0]
        names = [str(i) for i in range(k)] if names is None else [str(n) for n in names]
        if len(names) != k:
            raise ValueError(f"{source} has {k} rows but the vocabulary has {len(names)} names; row i must be the "
                             "embedding of name i (e.g. lvis_1203_cls_emb.pth goes with --vocab lvis1203)")
        ids = list(range(1, k + 1)) if category_ids is None else [int(c) for c in category_ids]
        if len(ids) != k:
            raise ValueError(f"{source}: {len(ids)} category ids for {k} classes")
        return cls(tuple(names), emb, tuple(ids), source)

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: Union[str, torch.device]) -> "Vocabulary":
        return Vocabulary(self.names, self.class_embeddings.to(device), self.category_ids, self.source)
