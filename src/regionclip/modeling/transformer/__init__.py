"""Transformer image towers (ViT, Swin, DaViT, FocalNet) as zero-shot region encoders (spec §11)."""
from .region_head import TransformerRegionDetector, TransformerRegionEncoder, pool_regions
from .vit import VisionTransformerTrunk

__all__ = ["TransformerRegionDetector", "TransformerRegionEncoder", "VisionTransformerTrunk", "pool_regions"]
