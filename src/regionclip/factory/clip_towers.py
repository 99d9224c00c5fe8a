"""Both towers of an OpenAI CLIP / RegionCLIP file as modules (the plain-CLIP baseline, pretraining init, and the
text tower that embeds class names: :func:`build_text_tower`).

The key conversion itself is the pure rename table of :mod:`regionclip.checkpoint.openai_clip`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from torch import Tensor

from ..checkpoint.io import CheckpointError, LoadReport, PathLike, load_into
from ..checkpoint.openai_clip import read_clip_checkpoint, split_clip_state_dict
from ..checkpoint.regionclip import infer_clip_resnet_config
from ..modeling.clip_resnet import ModifiedResNet
from ..modeling.text_encoder import CLIPTextTransformer, build_text_encoder, text_config_from_state_dict


def build_image_tower(sd: Mapping[str, Tensor]) -> ModifiedResNet:
    """A randomly initialised ModifiedResNet with the architecture of ``sd`` (keys without ``visual.``), using
    :func:`regionclip.checkpoint.regionclip.infer_clip_resnet_config` (shapes -> layers/width/dims/resolution)."""
    c = infer_clip_resnet_config(sd, prefix="")
    return ModifiedResNet(c.layers, c.embed_dim, c.heads, c.image_resolution, c.width)


def build_text_tower(sd: Mapping[str, Tensor], *, strict: bool = True, source: str = "") -> CLIPTextTransformer:
    """Build a :class:`CLIPTextTransformer` whose widths match ``sd`` and load it (float32, eval mode).

    Args:
        sd: text-tower state dict, keys as in :mod:`regionclip.modeling.text_encoder` (``lang_encoder.`` stripped).
        strict: raise :class:`regionclip.checkpoint.io.CheckpointError` on any missing/unexpected/mismatched key.
        source: name of the file, for error messages.
    Raises:
        CheckpointError: shapes that do not form a CLIP text tower, or (``strict``) keys that do not fit it.
    """
    try:
        model = build_text_encoder(text_config_from_state_dict(sd))
    except KeyError as e:
        raise CheckpointError(f"{source or 'checkpoint'}: text-encoder weights are incomplete ({e})") from e
    load_into(model, {k: v.float() for k, v in sd.items()}, strict=strict, source=source)
    return model.eval()


@dataclass
class ClipTowers:
    """Both towers of a CLIP/RegionCLIP file, loaded, float32, eval mode."""

    image: Optional[ModifiedResNet]  # None if absent
    text: Optional[CLIPTextTransformer]  # None if absent
    report: LoadReport


def load_clip_towers(path_or_sd: PathLike | Mapping[str, Tensor], *, allow_jit: bool = False,
                     strict: bool = True) -> ClipTowers:
    """Build and load the image and text towers of an OpenAI CLIP (RN50/RN50x4) or RegionCLIP file.

    Architectures are inferred from tensor shapes. With ``strict=True`` a key that no rename rule or ignore
    entry covers raises :class:`CheckpointError` (so an unexpected file layout is never half-loaded).
    """
    if isinstance(path_or_sd, Mapping):
        source, sd = "<state dict>", path_or_sd
    else:
        source, sd = str(path_or_sd), read_clip_checkpoint(path_or_sd, allow_jit=allow_jit)
    parts = split_clip_state_dict(sd, source)
    if strict and parts.unknown:
        raise CheckpointError(f"{source}: {len(parts.unknown)} keys belong to neither CLIP tower: "
                              f"{parts.unknown[:8]}; this is not an OpenAI CLIP / RegionCLIP file")
    report = LoadReport(source=source, ignored=parts.ignored, unexpected=list(parts.unknown))
    image = text = None
    if parts.image:
        image = build_image_tower(parts.image)
        report = report.merge(load_into(image, parts.image, strict=strict, source="image tower"))
        image.eval()
    if parts.text:
        text = build_text_tower(parts.text, strict=strict, source="text tower")
        report.loaded += sorted("text:" + k for k in parts.text)
    if image is None and text is None:
        raise CheckpointError(f"{source} holds neither a CLIP image tower nor a text tower")
    return ClipTowers(image=image, text=text, report=report)
