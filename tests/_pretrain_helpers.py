"""Tiny OpenAI-CLIP / RPN files and synthetic caption datasets (JSONL, tar shards, TSV) for the pretraining tests."""
from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from regionclip.config import RPNConfig
from regionclip.modeling.clip_resnet import ModifiedResNet
from regionclip.modeling.rpn import build_offline_rpn
from regionclip.modeling.text_encoder import CLIPTextTransformer

# attnpool heads = width * 32 / 64 (4 for width 8) as in every CLIP ResNet, because load_detector infers it that way;
# text width 64 / 1 head because the text loaders infer heads = width / 64.
TINY_VISUAL = dict(layers=(1, 1, 1, 1), output_dim=16, heads=4, input_resolution=64, width=8)
TINY_TEXT = dict(width=64, heads=1, layers=1, context_length=77, vocab_size=49408, embed_dim=16)
TINY_RPN = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                         fpn_out_channels=16)
CONCEPTS = ["square", "circle", "dog", "cat", "car", "tree", "house", "ball"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")


def _randomize_bn(module: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)


def write_tiny_openai_clip(path: Path, seed: int = 0) -> Path:
    """An OpenAI-CLIP-format state dict (``visual.*`` + top-level text keys + ``logit_scale``) of tiny towers."""
    torch.manual_seed(seed)
    visual = ModifiedResNet(**TINY_VISUAL)
    _randomize_bn(visual, torch.Generator().manual_seed(seed))
    text = CLIPTextTransformer(**TINY_TEXT)
    sd = {"visual." + k: v for k, v in visual.state_dict().items()}
    sd.update(text.state_dict())
    sd["logit_scale"] = torch.tensor(4.6052)
    torch.save(sd, path)
    return path


def write_tiny_rpn(path: Path, seed: int = 0) -> Path:
    """A detectron2-format RPN checkpoint (``{"model": {backbone.*, proposal_generator.*, pixel_mean}}``)."""
    torch.manual_seed(seed)
    rpn = build_offline_rpn(TINY_RPN)
    sd = {k: v for k, v in rpn.state_dict().items()}
    sd["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)  # dropped on load, as d2 extras are
    torch.save({"model": sd}, path)
    return path


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, Image.Image, str]]:
    """``n`` (key, image, caption) pairs: a coloured square/circle on a gray background, 64-96 px."""
    rng = np.random.default_rng(seed)
    out = []
    names = list(COLORS)
    for i in range(n):
        color, shape = names[i % len(names)], SHAPES[(i // len(names)) % 2]
        h, w = int(rng.integers(64, 97)), int(rng.integers(64, 97))
        img = Image.new("RGB", (w, h), (128, 128, 128))
        d = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        box = (x0, y0, x0 + w // 2, y0 + h // 2)
        (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
        out.append((f"{i:05d}", img, f"a {color} {shape} on a gray background"))
    return out


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_jsonl(folder: Path, pairs: list) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as f:
        for key, img, cap in pairs:
            img.save(folder / "images" / f"{key}.jpg", quality=95)
            f.write(json.dumps({"image": f"images/{key}.jpg", "caption": cap, "key": key}) + "\n")
    return folder / "pairs.jsonl"


def write_tar_shards(folder: Path, pairs: list, per_shard: int = 4) -> list[Path]:
    """webdataset layout: ``<key>.jpg`` + ``<key>.txt`` (odd samples use ``<key>.json`` with captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(pairs), per_shard):
        path = folder / f"shard-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for i, (key, img, cap) in enumerate(pairs[s:s + per_shard]):
                text = cap.encode() if i % 2 == 0 else json.dumps({"captions": [cap]}).encode()
                for name, data in ((f"{key}.jpg", _jpeg(img)), (f"{key}.{'txt' if i % 2 == 0 else 'json'}", text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_tsv(folder: Path, pairs: list, name: str = "train") -> tuple[Path, Path]:
    """The original's pair: ``<name>.images.tsv`` (key, base64 JPEG) + ``<name>.text.tsv`` (key, JSON captions)."""
    from regionclip.data.captions import write_lineidx

    folder.mkdir(parents=True, exist_ok=True)
    img_tsv, txt_tsv = folder / f"{name}.images.tsv", folder / f"{name}.text.tsv"
    with open(img_tsv, "w") as fi, open(txt_tsv, "w") as ft:
        for key, img, cap in pairs:
            fi.write(f"{key}\t{base64.b64encode(_jpeg(img)).decode()}\n")
            ft.write(f"{key}\t{json.dumps({'captions': [cap, cap.replace('a ', 'one ', 1)]})}\n")
    write_lineidx(img_tsv)
    write_lineidx(txt_tsv)
    return img_tsv, txt_tsv


def write_concepts(path: Path) -> Path:
    path.write_text("\n".join(CONCEPTS) + "\n")
    return path


def tiny_config(tmp: Path, data_paths: list[str], *, max_iter: int = 20, image_root: str | None = None,
                ims_per_batch: int = 4, **solver: object) -> dict:
    """A pretraining recipe dict for the tiny files written into ``tmp``."""
    clip = write_tiny_openai_clip(tmp / "clip_tiny.pth") if not (tmp / "clip_tiny.pth").exists() else \
        tmp / "clip_tiny.pth"
    rpn = write_tiny_rpn(tmp / "rpn_tiny.pth") if not (tmp / "rpn_tiny.pth").exists() else tmp / "rpn_tiny.pth"
    concepts = write_concepts(tmp / "concepts.txt")
    return {
        "model": {"clip_weights": str(clip), "rpn_weights": str(rpn)},
        "concepts": {"pool": str(concepts)},
        "data": {"paths": data_paths, "image_root": image_root, "min_size": 64, "max_size": 96},
        "pretrain": {"num_regions": 10},
        "solver": {"ims_per_batch": ims_per_batch, "base_lr": 0.02, "warmup_iters": 2, "steps": [max_iter * 10],
                   "max_iter": max_iter, **solver},
        "train": {"output_dir": str(tmp / "out"), "device": "cpu", "checkpoint_period": max_iter, "log_period": 1,
                  "progress": False, "tensorboard": False, "num_workers": 0},
    }
