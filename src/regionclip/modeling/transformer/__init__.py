"""Transformer image towers (ViT, Swin, DaViT, FocalNet) as zero-shot region encoders (docs/DESIGN.md#zero-shot-branch)."""
from .region_head import TransformerRegionDetector, TransformerRegionEncoder, pool_regions
from .vit import VisionTransformerTrunk

__all__ = ["TransformerRegionDetector", "TransformerRegionEncoder", "VisionTransformerTrunk", "pool_regions"]
