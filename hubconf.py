"""``torch.hub`` entry points of regionclip.

>>> import torch
>>> model = torch.hub.load("<owner>/regionclip", "regionclip", weights="regionclip_pretrained-cc_rn50x4")
>>> model.set_vocabulary("car, traffic cone")
>>> det = model.detect(["street.jpg"])[0]

``weights`` is anything :func:`regionclip.weights.pretrained.resolve_weights` accepts: a local file (``.pth`` or converted
``.safetensors``), a released name, or ``hf://user/repo``. Other keywords go to
:meth:`regionclip.RegionCLIP.from_pretrained` (``rpn_weights``, ``preset``, ``device``, ...: load-time choices;
post-processing is per call, ``model.detect(images, score_thresh=0.1)``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

dependencies = ["torch", "torchvision", "safetensors", "ftfy", "regex", "PIL", "yaml", "numpy", "tqdm"]

# torch.hub puts only this folder on sys.path; the package lives in src/ (an installed regionclip is used if the
# source tree is not there, e.g. when this file was copied on its own).
_SRC = Path(__file__).resolve().parent / "src"
if (_SRC / "regionclip").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from regionclip import RegionCLIP  # noqa: E402  (needs the path set above)


def regionclip(weights: Optional[str] = None, **kwargs: Any) -> RegionCLIP:
    """A loaded :class:`regionclip.RegionCLIP` (``weights`` default: ``regionclip_pretrained-cc_rn50``, or the
    preset's when ``preset=`` is given). Set a vocabulary (``model.set_vocabulary``) before ``model.detect``."""
    return RegionCLIP.from_pretrained(weights, **kwargs)
