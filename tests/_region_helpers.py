"""Tiny random models and images shared by the predictor / extraction / batching tests (seconds on 2 cores)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from PIL import Image

from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, PostprocessConfig, RPNConfig
from regionclip.factory import build_detector
from regionclip.modeling.detector import RegionCLIPDetector
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.text.vocabulary import Vocabulary

if TYPE_CHECKING:
    from regionclip.api import RegionCLIP

TINY_CLIP = ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=4, image_resolution=64)  # pooler 4
TINY_RPN = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                         fpn_out_channels=16, post_nms_topk=50, nms_thresh=0.9)


# what the tiny tests post-process with unless they say otherwise: keep everything, sigmoid objectness
TINY_POST = PostprocessConfig(score_thresh=0.0, rpn_score="sigmoid")


def tiny_detector(seed: int = 0, *, rpn: bool = False, min_size: int = 96, max_size: int = 128) -> RegionCLIPDetector:
    """Random-init tiny detector (float32, eval). BN statistics are randomised so FrozenBN is not an identity."""
    torch.manual_seed(seed)
    cfg = DetectorConfig(clip=TINY_CLIP, rpn=TINY_RPN if rpn else None,
                         input=InputConfig(min_size=min_size, max_size=max_size))
    det = build_detector(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in det.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")) and "rpn" not in name:
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return det.eval()


def tiny_pipeline(seed: int = 0, *, rpn: bool = False, min_size: int = 96, max_size: int = 128) -> Pipeline:
    """:func:`tiny_detector` inside the one inference pipeline (decode, resize, regions, encode, post-process)."""
    return Pipeline(tiny_detector(seed, rpn=rpn, min_size=min_size, max_size=max_size),
                    InputConfig(min_size=min_size, max_size=max_size))


def tiny_options(chunk: int = 256, postprocess: Optional[PostprocessConfig] = None, **kw) -> RunOptions:
    return RunOptions(postprocess=postprocess or TINY_POST, chunk_size=chunk, **kw)


def tiny_vocab(k: int = 5, seed: int = 3, dim: int = 16) -> Vocabulary:
    """K random class embeddings named c0..c{K-1}."""
    emb = torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))
    return Vocabulary.create(emb, [f"c{i}" for i in range(k)], embed_dim=dim)


def random_boxes(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """[n, 4] valid XYXY boxes inside an h x w image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 2.0
    b = torch.cat([xy, xy + wh], dim=1)
    b[:, 2] = b[:, 2].clamp(max=w)
    b[:, 3] = b[:, 3].clamp(max=h)
    return b


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, prefix: str = "img") -> list[Path]:
    """Random RGB JPEG-free PNG images of the given (H, W) sizes (PNG: lossless, so decoding is exact)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        p = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths



def as_regionclip(det: RegionCLIPDetector, input_cfg: InputConfig, postprocess: Optional[PostprocessConfig] = None,
                  cfg: Optional[DetectorConfig] = None) -> "RegionCLIP":
    """Any in-memory detector behind the :class:`~regionclip.api.RegionCLIP` front door (what the predictor and the
    demo take), with ``postprocess`` (default: PostprocessConfig()) as its resolved settings. It has no weights
    file, so it cannot embed class names: give it class embeddings (``set_vocabulary(names, tensor)``)."""
    from regionclip.api import RegionCLIP
    from regionclip.checkpoint.io import LoadReport
    from regionclip.checkpoint.regionclip import SplitCheckpoint
    from regionclip.factory import LoadedCheckpoint
    from regionclip.inference.presets import Settings

    settings = Settings(kind="pretrained", preset=None, regions="rpn" if det.rpn is not None else "gt",
                        vocabulary="lvis1203", postprocess=postprocess or PostprocessConfig(), rpn=())
    return RegionCLIP(det, LoadedCheckpoint(LoadReport("<in-memory detector>"), SplitCheckpoint(), cfg), settings,
                      input_cfg=input_cfg)


def tiny_model(seed: int = 0, *, rpn: bool = False, min_size: int = 96, max_size: int = 128,
               postprocess: Optional[PostprocessConfig] = None) -> "RegionCLIP":
    """:func:`tiny_detector` as a :class:`~regionclip.api.RegionCLIP` (see :func:`as_regionclip`) post-processing
    with :data:`TINY_POST` unless told otherwise."""
    input_cfg = InputConfig(min_size=min_size, max_size=max_size)
    cfg = DetectorConfig(clip=TINY_CLIP, rpn=TINY_RPN if rpn else None, input=input_cfg)
    return as_regionclip(tiny_detector(seed, rpn=rpn, min_size=min_size, max_size=max_size), input_cfg,
                         postprocess or TINY_POST, cfg)


def tiny_checkpoint_state(seed: int = 0, *, rpn: bool = False, finetuned_rows: int = 0) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the released key layout: ``backbone.*`` (CLIP RN, 16-d embeddings), ``lang_encoder.*``,
    with ``rpn`` the ``offline_*`` RPN, with ``finetuned_rows`` a fine-tuned box predictor of that many test classes.
    The CLI tests write it with :func:`write_tiny_checkpoint` and load it like a released file."""
    from regionclip.modeling.clip_resnet import ModifiedResNet
    from regionclip.modeling.rpn import build_offline_rpn
    from regionclip.modeling.text_encoder import CLIPTextTransformer

    torch.manual_seed(seed)
    vis = ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8)
    txt = CLIPTextTransformer(width=64, heads=1, layers=1, embed_dim=16)
    sd = {"backbone." + k: v for k, v in vis.state_dict().items()}
    sd.update({"lang_encoder." + k: v for k, v in txt.state_dict().items()})
    if rpn:
        for k, v in build_offline_rpn(TINY_RPN).state_dict().items():
            sd[("offline_" + k) if k.startswith(("backbone.", "proposal_generator.")) else k] = v
    if finetuned_rows:
        sd["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4, 16) * 1e-3
        sd["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(4)
        sd["roi_heads.box_predictor.cls_score.weight"] = torch.randn(866, 16)
        sd["roi_heads.box_predictor.test_cls_score.weight"] = torch.randn(finetuned_rows, 16)
        sd["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, 16)
    return sd


def write_tiny_checkpoint(path: Path, seed: int = 0, **kw: int) -> Path:
    """:func:`tiny_checkpoint_state` saved as ``{"model": ...}`` (the released files' wrapping) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": tiny_checkpoint_state(seed, **kw)}, path)
    return path
