"""regionclip: pure-PyTorch RegionCLIP (CVPR 2022) for zero-shot and open-vocabulary detection."""
from .api import RegionCLIP, parse_names
from .config import ClipResNetConfig, DetectorConfig, PostprocessConfig, RPNConfig
from .factory import build_detector, load_detector
from .pipeline import Pipeline, RunOptions
from .predictor import RegionPredictor
from .inference.presets import PRESETS
from .weights.pretrained import WEIGHTS
from .structures import Detections, Proposals
from .text.vocabulary import Vocabulary, resolve_vocabulary

__version__ = "0.1.0"
__all__ = ["RegionCLIP", "parse_names", "ClipResNetConfig", "DetectorConfig", "PostprocessConfig", "RPNConfig",
           "build_detector", "load_detector", "PRESETS", "WEIGHTS", "Detections", "Proposals",
           "Pipeline", "RunOptions", "RegionPredictor", "Vocabulary", "resolve_vocabulary", "__version__"]
