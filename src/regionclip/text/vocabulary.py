"""Vocabularies: what the user asks for -> ``(names, category ids)``, and the validated [K, D] class embeddings.

There is one resolver for every accepted vocabulary shape, :func:`resolve_vocabulary` (names list, comma string,
names file, built-in alias such as ``coco65``/``lvis1203``, class-embedding file, [K, D] tensor, ``(names, tensor)``
pair or a ready :class:`Vocabulary`); every front end (``RegionCLIP.make_vocabulary``, ``RegionPredictor``, the CLI)
calls it. :func:`resolve_names` is its names-only part, built on :func:`parse_vocabulary` (a ``--vocab`` string)
and :func:`read_names_file` (one name per line). :class:`Vocabulary` is the validated container the pipeline
classifies against. "Class embeddings" is the one name for the [K, D] text embeddings across the package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..assets import BUILTIN_VOCABULARIES, builtin_name, builtin_vocabulary
from ..assets import vocabulary as names_of_builtin
from ..checkpoint.convert import class_names_of
from ..checkpoint.io import PathLike, read_weight_file, weight_file_kind
from ..checkpoint.regionclip import class_embedding_file
from .prompts import validate_names

VocabularyArg = Union[str, os.PathLike, Sequence[str]]


def read_names_file(path: PathLike) -> list[str]:
    """One name per line (UTF-8, stripped). Trailing blank lines are ignored; a blank line in the middle is an
    error because row order defines class indices.

    Raises:
        ValueError: a line that is not valid UTF-8, or a blank line before the last name (file and line named).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # BOM from Windows editors
        raw = raw[3:]
    names: list[str] = []
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start}: "
                             f"{line[max(0, e.start - 10):e.start + 10]!r}); save the file as UTF-8") from None
        text = text.strip()
        if not text:
            raise ValueError(f"{path}, line {lineno}: blank line; every line must hold one class name (row order "
                             "defines class indices, so blank lines are not skipped)")
        names.append(text)
    if not names:
        raise ValueError(f"{path}: no class names (the file is empty)")
    return names


def parse_vocabulary(arg: str) -> list[str]:
    """Turn a ``--vocab`` argument into a list of names.

    Resolution order: a built-in name (``coco65``, ``coco48``, ``coco17``, ``lvis1203``, ``lvis866``; LVIS names
    are the original's prompt names, ``bat_(animal)`` -> ``bat animal``), then an existing text file (one name per
    line, see :func:`read_names_file`), else a comma-separated list (``"car,traffic cone"``; names are stripped).
    Commas inside a name can only be given through a file (the embedding removes them anyway, like the original).

    Raises:
        FileNotFoundError: the argument looks like a path (ends in ``.txt`` or contains a path separator) but
            does not exist.
        ValueError: empty argument, empty entries in a comma list, or a bad file.
    """
    if not arg or not arg.strip():
        raise ValueError("empty vocabulary; give names like 'car,traffic cone', a text file, or one of "
                         + ", ".join(BUILTIN_VOCABULARIES))
    try:
        return names_of_builtin(arg.strip())
    except ValueError:
        pass  # not a built-in name
    path = Path(arg).expanduser()
    if path.is_file():
        return read_names_file(path)
    if arg.endswith(".txt") or os.sep in arg or (os.altsep and os.altsep in arg):
        raise FileNotFoundError(f"vocabulary file not found: {arg}")
    names = [n.strip() for n in arg.split(",")]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"vocabulary {arg!r}: empty name at position(s) {empty} (stray comma?)")
    return names


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


# every shape a front end accepts as a vocabulary (see resolve_vocabulary)
VocabularyLike = Union[Vocabulary, str, os.PathLike, Sequence[str], Tensor, tuple[Sequence[str], Tensor], None]
EmbeddingsArg = Union[str, os.PathLike, Tensor, None]
MemoKey = tuple[str, ...]


def is_embedding_file(vocab: Any) -> bool:
    """Whether a vocabulary argument is really a tensor file (a class-embedding .pth/.safetensors)."""
    if not isinstance(vocab, (str, os.PathLike)) or is_builtin_vocabulary(vocab):
        return False
    p = Path(vocab)
    try:
        return p.is_file() and weight_file_kind(p) is not None
    except OSError:
        return False


def check_vocabulary_arg(vocab: Optional[VocabularyArg]) -> None:
    """The checks of a vocabulary argument (names, a names file, a built-in alias or a class-embedding file) that
    need no model - an empty vocabulary, empty names, a missing names file - so a CLI fails in milliseconds, before
    the checkpoint loads. Embedding files are read later, with the model."""
    if vocab is not None and not is_embedding_file(vocab):
        resolve_names(vocab)


def _numbered_or(default_vocab: Optional[VocabularyArg], rows: int) -> tuple[Optional[list[str]], Optional[list[int]]]:
    """(names, ids) of ``default_vocab`` when it has ``rows`` classes (coco_65_cls_emb with preset coco-gt gets the
    COCO names and ids), else (None, None): numbered classes."""
    if default_vocab is None:
        return None, None
    names, ids = resolve_names(default_vocab)
    return (names, ids) if len(names) == rows else (None, None)


def resolve_vocabulary(vocab: VocabularyLike = None, class_embeddings: EmbeddingsArg = None, *,
                       embed_names: Optional[Callable[[list[str]], Tensor]] = None, embed_dim: Optional[int] = None,
                       default_vocab: Optional[VocabularyArg] = None,
                       default_embeddings: Union[EmbeddingsArg, Callable[[], EmbeddingsArg]] = None,
                       model_name: str = "the model", source: Optional[str] = None) -> Vocabulary:
    """The one vocabulary resolver (docs/DESIGN.md#class-embeddings): any accepted shape -> a validated
    :class:`Vocabulary`.

    ``vocab``: a :class:`Vocabulary` (returned as is), names (a list, ``"car,bus"``, a names file, a built-in alias
    like ``coco65``/``lvis1203`` with its dataset's category ids), a class-embedding file given as names, a [K, D]
    tensor, or a ``(names, tensor)`` pair. ``class_embeddings``: a file or [K, D] tensor whose row i is name i.
    With neither, ``default_vocab`` (and ``default_embeddings`` when given). Names without embeddings are embedded
    by ``embed_names`` (the model's text tower, cached); embeddings without names get the names recorded in the
    file, else ``default_vocab``'s when the row count matches, else numbers. ``default_embeddings`` may be a
    callable, called only when the defaults are used (finding a preset's embedding file looks at the disk).
    ``source`` labels the result and its errors (default: the embedding file, or the model's text embeddings).

    Raises:
        ValueError: an empty or malformed vocabulary, rows that do not match the names, bad embeddings, or names
            to embed without ``embed_names``.
    """
    if isinstance(vocab, Vocabulary):
        return vocab
    if isinstance(vocab, tuple) and len(vocab) == 2 and isinstance(vocab[1], Tensor):  # (names, tensor)
        if class_embeddings is not None:
            raise ValueError("a (names, embeddings) vocabulary and class_embeddings= are both given; pass one")
        vocab, class_embeddings = list(vocab[0]), vocab[1]
    if isinstance(vocab, Tensor):  # a [K, D] tensor given where names were expected
        if class_embeddings is not None:
            raise ValueError("the vocabulary is a tensor and class_embeddings= is given too; pass one")
        vocab, class_embeddings = None, vocab
    if isinstance(vocab, (str, os.PathLike)) and is_embedding_file(vocab):  # an embedding file given as names
        if class_embeddings is not None:
            raise ValueError(f"the vocabulary {os.fspath(vocab)!r} is a tensor file, not class names, and "
                             "class_embeddings= is given too; pass the names (a list, a names file, coco65, "
                             "...) as the vocabulary and the embedding file as class_embeddings=")
        class_embeddings = os.fspath(vocab)
        vocab = None
    if vocab is None and class_embeddings is None:
        vocab = default_vocab
        class_embeddings = default_embeddings() if callable(default_embeddings) else default_embeddings
        if vocab is None and class_embeddings is None:
            raise ValueError("no vocabulary given: pass class names (e.g. ['cat', 'dog'] or 'coco65') or class "
                             "embeddings")
    names, ids = resolve_names(vocab) if vocab is not None else (None, None)
    if names is None and class_embeddings is not None and not isinstance(class_embeddings, Tensor):
        names, ids = class_names_of(class_embeddings)  # `regionclip convert` records them
    if class_embeddings is not None:
        src = "class embeddings" if isinstance(class_embeddings, Tensor) else str(class_embeddings)
        if names is not None and isinstance(vocab, (str, os.PathLike)) and not is_builtin_vocabulary(vocab):
            validate_names(names, source=f"vocabulary for {src}")  # duplicates warn, as on the text path
        emb = class_embeddings if isinstance(class_embeddings, Tensor) else \
            class_embedding_file(read_weight_file(class_embeddings), src)
        if names is None:  # rows without names: the default vocabulary when the row count says it is that one
            names, ids = _numbered_or(default_vocab, int(emb.reshape(-1, emb.shape[-1]).shape[0]))
        return Vocabulary.create(emb, names, ids, embed_dim=embed_dim,
                                 source=source or f"{src} (for model {model_name})")
    assert names is not None
    if embed_names is None:
        raise ValueError(f"class names {names[:3]}... need a text encoder to embed them; pass class embeddings "
                         "instead")
    return Vocabulary.create(embed_names(names), names, ids, embed_dim=embed_dim,
                             source=source or f"text embeddings of {model_name}")


def resolve_memoised(vocab: VocabularyLike, resolve: Callable[[VocabularyLike], Vocabulary],
                     memo: dict[MemoKey, Vocabulary], *, current: Callable[[], Vocabulary]) -> Vocabulary:
    """A front end's per-call vocabulary: ``None`` -> ``current()`` (the vocabulary already set); names (a string -
    comma list, names file or built-in alias - or a list of strings) -> ``resolve(vocab)`` once, remembered in
    ``memo`` (embedding names is the text tower's work); anything else -> ``resolve(vocab)`` every time.

    The memo key tells a string from a list, so ``"coco65"`` (the built-in, 65 classes) and ``["coco65"]`` (one class
    of that name) stay apart.
    """
    if vocab is None:
        return current()
    if isinstance(vocab, str):
        key: MemoKey = ("str", vocab)
    elif isinstance(vocab, list) and all(isinstance(n, str) for n in vocab):
        key = ("names", *vocab)
    else:
        return resolve(vocab)
    if key not in memo:
        memo[key] = resolve(vocab)
    return memo[key]
