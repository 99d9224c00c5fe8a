"""RegionCLIP detector: CLIP res4 once per image, every region through RoIAlign -> CLIP res5 -> attnpool.

Composition (spec §0, §1.3, §4): ``backbone`` (CLIP ModifiedResNet, frozen BN), optional ``rpn`` (offline
detectron2 RPN, localization only), optional ``bbox_pred`` (class-agnostic regression of fine-tuned checkpoints),
optional ``mask_head`` (LVIS fine-tuned). Classification is the text-embedding classifier of
:func:`regionclip.modeling.heads.text_classifier_logits` with embeddings given per call or set once with
:meth:`RegionCLIPDetector.set_vocabulary`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..config import InputConfig, PostprocessConfig
from ..data.images import ImageInput, load_image, resize_image
from ..ops.box_coder import decode_boxes
from ..ops.boxes import clip_boxes, scale_boxes_like_d2, validate_boxes
from ..postprocess import combine_rpn_scores, postprocess_detections, rescale_to_original
from ..structures import Detections, Proposals
from ..utils import autocast_context
from .clip_resnet import ModifiedResNet
from .heads import MaskHead, paste_masks, text_classifier_logits

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # detectron2 ROI_BOX_HEAD.BBOX_REG_WEIGHTS
RES4_STRIDE = 16  # declared res4 stride: RoIAlign always uses exactly 1/16 even though res4 is floor-divided


@dataclass
class PreparedImage:
    """A decoded image resized for the model (uint8 RGB [3, h, w]) and both frames' sizes."""

    image: Tensor
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]


class RegionCLIPDetector(nn.Module):
    """Implements :class:`regionclip.modeling.recognizer.RegionRecognizer` (with a background column)."""

    has_background = True  # classify() returns [R, K+1], background last

    def __init__(self, backbone: ModifiedResNet, rpn: Optional[nn.Module] = None, *,
                 bbox_pred: Optional[nn.Linear] = None, mask_head: Optional[MaskHead] = None,
                 input_cfg: InputConfig = InputConfig(), postprocess_cfg: PostprocessConfig = PostprocessConfig(),
                 pooler_resolution: int = 14, sampling_ratio: int = 0, temperature: float = 0.01,
                 region_chunk_size: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.bbox_pred = bbox_pred
        self.mask_head = mask_head
        self.input_cfg = input_cfg
        self.postprocess_cfg = postprocess_cfg
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.temperature = temperature
        self.region_chunk_size = region_chunk_size
        self.register_buffer("pixel_mean", torch.tensor(input_cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(input_cfg.pixel_std).view(3, 1, 1), persistent=False)
        self.register_buffer("class_embeddings", torch.zeros(0, backbone.output_dim), persistent=False)
        self.class_names: list[str] = []
        # "bfloat16"/"float16": autocast for the CLIP backbone and the RoI head (the RPN and the classifier always
        # run in float32: proposal boxes and the 1/0.01-scaled logits need the precision)
        self.compute_dtype = "float32"

    @property
    def embed_dim(self) -> int:
        return self.backbone.output_dim

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, class_embeddings: Tensor, class_names: Optional[Sequence[str]] = None,
                       source: str = "class embeddings") -> None:
        """Set the [K, D] text embeddings (any norm) used when ``detect`` gets none."""
        emb = torch.as_tensor(class_embeddings).float()
        if emb.ndim == 1:  # the original's extraction squeezed a 1-concept file to [D]
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"{source}: expected a non-empty [K, D] tensor, got shape {tuple(emb.shape)}")
        if emb.shape[1] != self.embed_dim:
            raise ValueError(f"{source} are {emb.shape[1]}-d but this model's region embeddings are "
                             f"{self.embed_dim}-d; use embeddings made with the same CLIP model "
                             "(1024-d = RN50, 640-d = RN50x4)")
        names = list(class_names) if class_names is not None else [str(i) for i in range(emb.shape[0])]
        if len(names) != emb.shape[0]:
            raise ValueError(f"{source} has {emb.shape[0]} rows but {len(names)} class names were given; "
                             "row i must be the embedding of class i")
        self.class_embeddings = emb.to(self.device)
        self.class_names = names

    # ------------------------------------------------------------------ stages
    def prepare(self, image: ImageInput) -> PreparedImage:
        """Decode + test-time resize (shortest edge ``min_size``, longest ≤ ``max_size``, PIL bilinear)."""
        img = load_image(image)
        resized = resize_image(img, self.input_cfg.min_size, self.input_cfg.max_size)
        return PreparedImage(resized, (int(img.shape[1]), int(img.shape[2])),
                             (int(resized.shape[1]), int(resized.shape[2])))

    def normalize_batch(self, images: Sequence[Tensor]) -> Tensor:
        """CLIP normalization (/255, -mean, /std) and bottom/right zero padding to the batch max size."""
        normed = [((x.to(self.device).float() / 255.0) - self.pixel_mean) / self.pixel_std for x in images]
        h = max(x.shape[1] for x in normed)
        w = max(x.shape[2] for x in normed)
        batch = normed[0].new_zeros(len(normed), 3, h, w)
        for i, x in enumerate(normed):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return batch

    def compute_res4(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images -> res4 map [B, C4, ~H/16, ~W/16] of the padded batch."""
        return self.backbone.forward_res4(self.normalize_batch(images))

    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """The :class:`~regionclip.modeling.recognizer.RegionRecognizer` name of :meth:`compute_res4`."""
        return self.compute_res4(images)

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]:
        if self.rpn is None:
            raise RuntimeError("this model has no region proposal network: pass boxes (GT/user-box mode), or load "
                               "RPN weights (e.g. --rpn-weights rpn_lvis_866.pth)")
        return self.rpn([x.to(self.device).float() for x in images])

    def encode_regions(self, res4: Tensor, boxes: Sequence[Tensor], *, return_res5: bool = False,
                       chunk_size: Optional[int] = None) -> Any:
        """Region embeddings: RoIAlignV2 on res4 -> CLIP layer4 -> attnpool, in chunks.

        Args:
            res4: [B, C, H, W] from :meth:`compute_res4`.
            boxes: per image [R_i, 4] XYXY in resized-image pixels.
            return_res5: also return the [R, C5, S, S] res5 maps (mask head).
        Returns [sum R_i, D] raw (unnormalized) embeddings in input order (and res5 maps if asked).
        """
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=res4.device, dtype=res4.dtype),
                                     b.to(res4.device, res4.dtype)], dim=1) for i, b in enumerate(boxes)], dim=0) \
            if len(boxes) else res4.new_zeros(0, 5)
        chunk = chunk_size or self.region_chunk_size or max(1, rois.shape[0])
        embs, res5s = [], []
        for start in range(0, rois.shape[0], chunk):
            pooled = roi_align(res4, rois[start:start + chunk], output_size=self.pooler_resolution,
                               spatial_scale=1.0 / RES4_STRIDE, sampling_ratio=self.sampling_ratio, aligned=True)
            res5 = self.backbone.layer4(pooled)
            embs.append(self.backbone.attnpool(res5))
            if return_res5:
                res5s.append(res5)
        emb = torch.cat(embs) if embs else res4.new_zeros(0, self.embed_dim)
        if return_res5:
            return emb, (torch.cat(res5s) if res5s else None)
        return emb

    def classify(self, region_emb: Tensor, class_embeddings: Optional[Tensor] = None) -> Tensor:
        """[R, D] embeddings -> [R, K+1] softmax probabilities (background last)."""
        emb = self.class_embeddings if class_embeddings is None else class_embeddings.to(region_emb.device)
        if emb.numel() == 0:
            raise ValueError("no vocabulary set: pass class embeddings or call set_vocabulary() "
                             "(CLI: --vocab 'cat,dog' or --concept-emb file.pth)")
        # always float32, also inside an autocast region: cosines are scaled by 1/0.01 before the softmax
        with torch.autocast(device_type=region_emb.device.type, enabled=False):
            return F.softmax(text_classifier_logits(region_emb.float(), emb.float(), self.temperature), dim=-1)

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor, apply_deltas: bool) -> Tensor:
        """Class-agnostic box regression from the raw attnpool embedding (fine-tuned checkpoints)."""
        if not apply_deltas or self.bbox_pred is None:
            return proposal_boxes
        deltas = self.bbox_pred(region_emb.to(self.bbox_pred.weight.dtype)).float()
        return decode_boxes(deltas, proposal_boxes.float(), weights=BOX_REG_WEIGHTS)

    # ------------------------------------------------------------------ end to end
    def regions_from_user_boxes(self, boxes: Any, prepared: PreparedImage, frame: str = "original") -> Proposals:
        """User/GT boxes (XYXY) -> resized-frame regions (scaled, clipped; no objectness).

        ``frame="resized"`` if the boxes are already in the resized frame (as the parity fixtures). Scaling
        follows the original's dataset mapper exactly: the coordinates are multiplied in float64 (numpy), and
        *integer* boxes (a JSON with whole numbers, an integer tensor) are truncated toward zero after scaling,
        because detectron2 scales them inside an integer array. Float boxes are not truncated.
        """
        h, w = prepared.original_hw if frame == "original" else prepared.resized_hw
        b = validate_boxes(boxes, h, w)
        if frame == "original":
            raw = torch.as_tensor(boxes).reshape(-1, 4)
            b = scale_boxes_like_d2(raw, *prepared.scale_xy, truncate=not raw.is_floating_point())
        b = clip_boxes(b, *prepared.resized_hw)
        return Proposals(b, None)

    @torch.no_grad()
    def detect_prepared(self, prepared: Sequence[PreparedImage], regions: Optional[Sequence[Proposals]] = None,
                        *, class_embeddings: Optional[Tensor] = None, class_names: Optional[Sequence[str]] = None,
                        postprocess: Optional[PostprocessConfig] = None, keep_probs: bool = False,
                        keep_features: bool = False, res4: Optional[Tensor] = None) -> list[Detections]:
        """Detect on already prepared images.

        ``regions`` (resized frame): None runs the RPN; user/GT regions (no objectness) select GT mode; regions
        *with* objectness logits are taken as precomputed RPN proposals (e.g. a top-k slice of :meth:`propose`).
        ``keep_features`` stores each detection's raw [D] source-region embedding in ``Detections.features``.
        """
        cfg = postprocess or self.postprocess_cfg
        images = [p.image for p in prepared]
        gt_mode = regions is not None and all(r.objectness_logits is None for r in regions)
        if regions is None:
            regions = self.propose(images)
        if gt_mode and cfg.rpn_score != "none":
            cfg = replace(cfg, rpn_score="none")  # no objectness for given boxes (the original can't do it either)
        with autocast_context(self.device, self.compute_dtype):
            if res4 is None:
                res4 = self.compute_res4(images)
            emb = self.encode_regions(res4, [r.boxes for r in regions]).float()
        probs_all = self.classify(emb, class_embeddings)
        names = list(class_names) if class_names is not None else (
            self.class_names if class_embeddings is None else
            [str(i) for i in range(probs_all.shape[1] - int(self.has_background))])
        results, start = [], 0
        for img_i, (p, r) in enumerate(zip(prepared, regions)):
            n = r.boxes.shape[0]
            e, probs = emb[start:start + n], probs_all[start:start + n]
            start += n
            scores = combine_rpn_scores(probs, r.objectness_logits, cfg.rpn_score)
            boxes = self.predict_boxes(e, r.boxes.to(e.device), cfg.apply_box_deltas and not gt_mode)
            dets = postprocess_detections(boxes, scores, p.resized_hw, cfg, probs=probs,
                                          has_background=self.has_background)
            out = rescale_to_original(dets, p.resized_hw, p.original_hw)
            masks = None
            if self.mask_head is not None:
                # like detectron2's forward_with_given_boxes: re-pool res4 at the *final* boxes for the masks
                _, res5 = self.encode_regions(res4[img_i:img_i + 1], [dets["boxes"][out["keep"]]], return_res5=True)
                logits = self.mask_head(res5) if res5 is not None else res4.new_zeros(0, 1, 1, 1)
                masks = paste_masks(logits, out["boxes"], *p.original_hw)
            results.append(Detections(
                boxes=out["boxes"], scores=out["scores"], labels=out["labels"], image_size=p.original_hw,
                class_names=names, region_index=out["region_index"],
                probs=probs[out["region_index"]] if keep_probs else None, masks=masks,
                features=e[out["region_index"]] if keep_features else None))
        return results

    def detect(self, images: Sequence[ImageInput], boxes: Optional[Sequence[Any]] = None, **kwargs: Any
               ) -> list[Detections]:
        """Detect on a batch of images (paths, PIL, arrays or uint8 tensors).

        ``boxes``: optional per-image user boxes (XYXY, original pixels) → GT/box-prompt mode (no RPN, no box
        deltas, no RPN score multiplication). Otherwise regions come from the offline RPN.
        """
        prepared = [self.prepare(im) for im in images]
        regions = None
        if boxes is not None:
            if len(boxes) != len(prepared):
                raise ValueError(f"got boxes for {len(boxes)} images but {len(prepared)} images")
            regions = [self.regions_from_user_boxes(b, p) for b, p in zip(boxes, prepared)]
        return self.detect_prepared(prepared, regions, **kwargs)
