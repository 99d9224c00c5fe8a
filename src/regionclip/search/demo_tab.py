"""The web demo's "Search" tab: a text query over an indexed collection, results as a gallery of region crops.

``demo/app.py`` calls :func:`build_search_tab` inside its ``gr.Blocks`` (within a ``gr.Tab("Search")``) when
``regionclip demo --index DIR`` is given. The search itself is :func:`search_gallery`, a plain function (tested
without a browser).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch

from .html import hit_crop
from .index import RegionIndex

PathLike = Union[str, os.PathLike]
EmbedTextFn = Callable[[list], Any]  # list of K strings -> [K, D] raw text embeddings (e.g. RegionCLIP.embed_names)


def search_gallery(index: RegionIndex, embed_text_fn: EmbedTextFn, query: str, top_k: int = 24, *,
                   image_root: Optional[PathLike] = None) -> tuple[list[tuple[Any, str]], str]:
    """Embed ``query``, search, crop. Returns ([(PIL crop, caption)], status line); raises ValueError on an empty
    query or a width mismatch (the demo shows it as an error message)."""
    query = (query or "").strip()
    if not query:
        raise ValueError("type what to search for, e.g. 'a red forklift'")
    emb = torch.as_tensor(embed_text_fn([query]))
    hits = index.search(emb.reshape(emb.shape[0], -1)[0], int(top_k))
    items, missing = [], 0
    for h in hits:
        crop = hit_crop(h, image_root)
        if crop is None:
            missing += 1
            continue
        items.append((crop, f"#{h.rank} {h.score:.3f} {os.path.basename(h.file_name)}"))
    status = f"{len(hits)} best of {index.num_regions} regions for {query!r}"
    if missing:
        status += f" ({missing} images not found; start the demo with the images where they were extracted)"
    return items, status


def build_search_tab(index: RegionIndex, embed_text_fn: EmbedTextFn, *,
                     image_root: Optional[PathLike] = None) -> None:
    """Create the Search components in the current gradio context (a ``gr.Tab`` inside ``gr.Blocks``).

    Elements have ids ``rc-search-query``, ``rc-search-topk``, ``rc-search-run``, ``rc-search-status`` and
    ``rc-search-gallery`` (for browser tests)."""
    import gradio as gr

    def run(query: str, top_k: float) -> tuple[list, str]:
        try:
            return search_gallery(index, embed_text_fn, query, int(top_k), image_root=image_root)
        except ValueError as e:  # user errors as a message in the page, not a stack trace
            raise gr.Error(str(e)) from e

    gr.Markdown(f"Search {index.num_regions} indexed regions ({index.embed_dim}-d, {index.backend}) by text.")
    with gr.Row():
        query = gr.Textbox(label="Search for", placeholder="a red forklift", scale=4, elem_id="rc-search-query")
        top_k = gr.Slider(1, 100, value=24, step=1, label="Results", scale=1, elem_id="rc-search-topk")
    button = gr.Button("Search", variant="primary", elem_id="rc-search-run")
    status = gr.Markdown(elem_id="rc-search-status")
    gallery = gr.Gallery(label="Best regions", columns=6, height="auto", object_fit="contain",
                         elem_id="rc-search-gallery")
    button.click(run, [query, top_k], [gallery, status])
    query.submit(run, [query, top_k], [gallery, status])
