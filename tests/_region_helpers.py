"""Tiny random models and images shared by the predictor / extraction / batching tests (seconds on 2 cores)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, PostprocessConfig, RPNConfig
from regionclip.factory import build_detector
from regionclip.modeling.detector import RegionCLIPDetector

TINY_CLIP = ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=4, image_resolution=64)  # pooler 4
TINY_RPN = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                         fpn_out_channels=16, post_nms_topk=50, nms_thresh=0.9)


def tiny_detector(seed: int = 0, *, rpn: bool = False, min_size: int = 96, max_size: int = 128,
                  chunk: int = 256, postprocess: Optional[PostprocessConfig] = None) -> RegionCLIPDetector:
    """Random-init tiny detector (float32, eval). BN statistics are randomised so FrozenBN is not an identity."""
    torch.manual_seed(seed)
    cfg = DetectorConfig(clip=TINY_CLIP, rpn=TINY_RPN if rpn else None,
                         input=InputConfig(min_size=min_size, max_size=max_size),
                         postprocess=postprocess or PostprocessConfig(score_thresh=0.0, rpn_score="sigmoid"),
                         region_chunk_size=chunk)
    det = build_detector(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in det.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")) and "rpn" not in name:
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return det.eval()


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
