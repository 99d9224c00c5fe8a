"""Offline detectron2 RPN (localization branch): R50-FPN, R50-FPN-LSJ, R50-C4 and the FPN on a CLIP ResNet trunk
(``rpn_lvis_1203_clipbackbone``) (docs/DESIGN.md#offline-rpn).

Typical use (the key conversion and the architecture read off the shapes live in :mod:`regionclip.checkpoint.rpn_keys`)::

    sd, ignored = rpn_state_dict_from_checkpoint(torch.load(path, weights_only=True))
    rpn = build_offline_rpn(infer_rpn_config(sd, nms_thresh=0.9))
    rpn.load_state_dict(sd)
    proposals = rpn([image_rgb_0_255])  # list[Proposals], resized-image coordinates
"""
from .anchors import generate_cell_anchors, grid_anchors
from .clip_trunk import ClipResNetTrunk
from .fpn import FPN
from .model import C4Backbone, OfflineRPN, build_offline_rpn
from .resnet import FrozenBatchNorm2d, ResNet
from .rpn_head import RPN, StandardRPNHead, find_top_rpn_proposals

__all__ = [
    "OfflineRPN", "build_offline_rpn",
    "RPN", "StandardRPNHead", "find_top_rpn_proposals", "FPN", "ResNet", "C4Backbone", "ClipResNetTrunk",
    "FrozenBatchNorm2d",
    "generate_cell_anchors", "grid_anchors",
]
