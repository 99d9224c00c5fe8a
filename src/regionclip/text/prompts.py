"""Prompt construction for concept / class embeddings (docs/DESIGN.md#class-embeddings).

The original fills each concept into every template with ``template.replace('{}', name)`` after removing
commas and turning ``+`` into a space (``prompt_engineering`` in ``clip_prompt_utils.py``). ``str.replace``
(not ``str.format``) matters: a name containing braces must not be interpreted as a format string.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from regionclip.assets import prompt_templates


def default_templates(kind: str = "regionclip") -> list[str]:
    """The 81 RegionCLIP templates (``"regionclip"``) or the zero-shot branch's 2 (``"zeroshot"``)."""
    return prompt_templates(kind)


def clean_concept(name: str) -> str:
    """The original's concept cleaning: commas removed, ``+`` -> space (``"hot+dog, food"`` -> ``"hot dog food"``
    after the tokenizer collapses the double space)."""
    return name.replace(",", "").replace("+", " ")


def lvis_prompt_name(raw_name: str) -> str:
    """LVIS category name -> prompt text: ``_`` -> space, parentheses removed (``bat_(animal)`` -> ``bat animal``)."""
    return raw_name.replace("_", " ").replace("(", "").replace(")", "")


def fill_template(template: str, name: str) -> str:
    """One prompt: every ``{}`` in ``template`` replaced by the cleaned ``name``."""
    return template.replace("{}", clean_concept(name))


def build_prompts(name: str, templates: Sequence[str]) -> list[str]:
    """All prompts of one concept, in template order."""
    return [fill_template(t, name) for t in templates]


def resolve_templates(templates: Optional[Union[str, Sequence[str], Path]] = None) -> list[str]:
    """Normalise a templates argument to a list of strings.

    Args:
        templates: ``None`` (the 81 RegionCLIP templates), a built-in kind (``"regionclip"``, ``"zeroshot"``),
            a path to a UTF-8 text file with one template per line, or an explicit sequence of templates.

    Raises:
        ValueError: no templates, or a template without ``{}`` (the concept would never appear in the prompt).
    """
    if templates is None:
        out = default_templates("regionclip")
    elif isinstance(templates, (str, Path)) and str(templates) in ("regionclip", "zeroshot"):
        out = default_templates(str(templates))
    elif isinstance(templates, Path) or (isinstance(templates, str) and Path(templates).is_file()):
        path = Path(templates)
        out = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    elif isinstance(templates, str):
        raise ValueError(f"templates {templates!r} is neither 'regionclip', 'zeroshot' nor an existing file; pass "
                         "a list of strings to use a single template")
    else:
        out = [str(t) for t in templates]
    if not out:
        raise ValueError("no prompt templates given; use None for the 81 RegionCLIP templates")
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates must contain '{{}}' where the concept goes; these do not: {bad[:3]}")
    return out


def validate_names(names: Sequence[str], source: str = "vocabulary") -> list[str]:
    """Check a class / concept list before embedding it; returns it unchanged (row i = names[i]).

    Policy (documented in docs and tested):
      * empty or whitespace-only names -> ``ValueError`` (the prompt would be just the template, e.g. ``"."``);
      * duplicate names -> ``UserWarning``, both kept, so that row indices still match the caller's list;
      * names whose prompts exceed 77 tokens are *not* checked here (see
        :func:`regionclip.text.embeddings.concept_embeddings`, which warns and truncates like the original).

    Raises:
        ValueError: no names at all, a non-string entry, or an empty name (its position is given).
    """
    names = list(names)
    if not names:
        raise ValueError(f"{source}: no class names given")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"{source}: entry {i} is a {type(n).__name__}, not a string: {n!r}")
        if not clean_concept(n).strip():
            raise ValueError(f"{source}: class name #{i} is empty ({n!r}); remove it or give it a name "
                             "(row order defines class indices, so it cannot be skipped silently)")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        key = " ".join(clean_concept(n).lower().split())  # names that give identical prompts count as duplicates
        if key in seen:
            dups.append(f"{n!r} (#{seen[key]} and #{i})")
        else:
            seen[key] = i
    if dups:
        warnings.warn(f"{source}: duplicate class names {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}; "
                      "kept (identical rows) so that row indices match your list", UserWarning, stacklevel=3)
    return names
