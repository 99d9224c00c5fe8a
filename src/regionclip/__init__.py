"""regionclip: pure-PyTorch RegionCLIP (CVPR 2022) for zero-shot and open-vocabulary detection.

The public names (docs/DESIGN.md#layout; tests/test_layout.py checks them): the front doors ``RegionCLIP`` and
``RegionPredictor``; load-time choices ``LoadOptions``, per-call ones ``RunOptions``, classes ``Vocabulary`` (from
``resolve_vocabulary``); the inference path ``Pipeline`` and its outputs.
"""
from .api import RegionCLIP, parse_names
from .config import ClipResNetConfig, DetectorConfig, InputConfig, PostprocessConfig, RPNConfig
from .factory import build_detector, load_detector
from .inference.presets import PRESETS, LoadOptions
from .pipeline import ImageResult, Pipeline, RunOptions
from .predictor import BoxClassification, RegionPredictor
from .structures import Detections, Proposals
from .text.vocabulary import Vocabulary, resolve_vocabulary
from .weights.pretrained import WEIGHTS

__version__ = "0.1.0"
__all__ = [
    "RegionCLIP", "RegionPredictor", "BoxClassification",  # front doors
    "LoadOptions", "RunOptions", "Vocabulary", "resolve_vocabulary", "parse_names",  # what they take
    "Pipeline", "ImageResult", "Detections", "Proposals",  # the inference path and its outputs
    "ClipResNetConfig", "DetectorConfig", "InputConfig", "PostprocessConfig", "RPNConfig",  # model configs
    "build_detector", "load_detector", "PRESETS", "WEIGHTS", "__version__",
]
