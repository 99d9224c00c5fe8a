"""Region-text pretraining losses (docs/DESIGN.md#pretraining), as pure functions of embeddings, plus the pieces they need:
an all-gather that keeps the gradient, the teacher's pseudo labels and per-parameter gradient clipping.

Shapes: region / image embeddings are raw (unnormalised) [N, D] attnpool outputs; concept pools are raw [C, D]
text embeddings (81-template means, :mod:`regionclip.text.embeddings`). Every function L2-normalises what the
original normalises and computes in float32 whatever the autocast dtype, because a temperature of 0.01 turns
bf16 rounding of the cosines (~4e-3) into logit errors of ~0.4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_with_grad", "image_text_contrastive_loss", "teacher_pseudo_labels", "PseudoLabels",
           "region_concept_distillation_loss", "region_concept_contrastive_loss",
           "clip_grad_norm_per_parameter_"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally sized [n, ...] tensors whose backward returns this rank's slice of the *summed*
    incoming gradient.

    Every rank computes the same global loss from the gathered tensor, so the gradient of sample j (living on
    rank r) is the sum over ranks of what each rank's copy of the loss sends to it: an all-reduce (SUM) of the
    full gradient, then the own slice. With DDP's averaging of parameter gradients over the W ranks this gives
    exactly the gradient of a single process holding the whole batch. All-reduce works on every backend (gloo
    has no reduce-scatter), and the tensors are small ([B, D] embeddings).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank (rank order), keeping the gradient to every rank's samples.

    Each rank's tensor is first truncated to the smallest per-rank batch (the original's ``GATHER_GPUS``: the
    last batch of an epoch may be smaller on some ranks, and all-gather needs equal shapes). Single process:
    ``x`` unchanged.
    """
    world = _world_size()
    if world == 1:
        return x
    sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    n = int(min(int(s) for s in all_sizes))
    return _AllGatherWithGrad.apply(x[:n])


def image_text_contrastive_loss(image_emb: Tensor, text_emb: Tensor, temperature: float = 0.01,
                                gather: bool = True) -> Tensor:
    """Symmetric InfoNCE between whole-image region embeddings and caption embeddings (``loss_img_txt_level``).

    Args:
        image_emb: [B, D] raw embeddings of the whole-image boxes (student).
        text_emb: [B, D] raw caption embeddings (EOT pooling), row i = the caption of image i.
        temperature: logits = cos / temperature (``CLSS_TEMP`` 0.01).
        gather: all-gather both sides across ranks with gradient (``GATHER_GPUS True``) so the B x B matrix
            covers the global batch.

    Returns:
        scalar ``(CE(S, diag) + CE(S^T, diag)) / 2`` with ``S = norm(f_g) norm(e)^T / temperature``.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image and text embeddings must both be [B, D], got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    if gather:
        img, txt = gather_with_grad(img), gather_with_grad(txt)
    logits = img @ txt.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@dataclass
class PseudoLabels:
    """Teacher pseudo labels of N regions over C concepts.

    ``probs`` [N, C] teacher softmax; ``keep`` [N] bool, regions used by the losses; ``targets`` [N] argmax
    concept; ``fallback`` True when no region passed the threshold and all were kept.
    """

    probs: Tensor
    keep: Tensor
    targets: Tensor
    fallback: bool


@torch.no_grad()
def teacher_pseudo_labels(teacher_region_emb: Tensor, teacher_concept_emb: Tensor, temperature: float = 0.01,
                          threshold: float = 0.1) -> PseudoLabels:
    """Soft and hard concept labels from the frozen teacher (docs/DESIGN.md#pretraining step 4).

    ``q = softmax(norm(f_t) norm(C)^T / temperature)``; regions whose max probability exceeds ``threshold``
    (``CONCEPT_THRES`` 0.1) are kept. If none does, the original keeps regions with max > 0 — i.e. all of them
    (a softmax is positive), which is what ``fallback`` reports. ``targets`` = argmax concept.
    """
    if teacher_region_emb.shape[-1] != teacher_concept_emb.shape[-1]:
        raise ValueError(f"teacher region embeddings are {teacher_region_emb.shape[-1]}-d but the teacher concept "
                         f"pool is {teacher_concept_emb.shape[-1]}-d; embed the concepts with the teacher's "
                         "text encoder")
    t = F.normalize(teacher_region_emb.float(), dim=-1)
    c = F.normalize(teacher_concept_emb.float(), dim=-1)
    q = F.softmax(t @ c.t() / temperature, dim=-1)
    top, targets = q.max(dim=-1)
    keep = top > threshold
    fallback = bool(q.shape[0] > 0 and not keep.any())
    if fallback:
        keep = top > 0
    return PseudoLabels(q, keep, targets, fallback)


def region_concept_distillation_loss(student_region_emb: Tensor, student_concept_emb: Tensor,
                                     teacher_probs: Tensor, temperature: float = 0.01) -> Tensor:
    """``loss_region_distill``: KL(q || s) with "batchmean" over the N (kept) regions.

    ``s = softmax(norm(f_r) norm(C)^T / temperature)``; result ``(1/N) sum_i sum_c q_ic (log q_ic - log s_ic)``
    (terms with ``q_ic = 0`` count 0). N = 0 gives a zero that still depends on the embeddings (so DDP sees a
    gradient for every parameter).
    """
    if student_region_emb.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"{student_region_emb.shape[0]} student regions but {teacher_probs.shape[0]} teacher "
                         "label rows")
    if student_region_emb.shape[0] == 0:
        return student_region_emb.float().sum() * 0.0
    f = F.normalize(student_region_emb.float(), dim=-1)
    c = F.normalize(student_concept_emb.float(), dim=-1)
    log_s = F.log_softmax(f @ c.t() / temperature, dim=-1)
    return F.kl_div(log_s, teacher_probs.float(), reduction="batchmean")


def region_concept_contrastive_loss(student_region_emb: Tensor, student_concept_emb: Tensor, targets: Tensor,
                                    temperature: float = 0.01) -> Tensor:
    """``loss_concept_contrastive``: multi-positive ("MIL") contrastive loss between regions and the concept
    embeddings of their pseudo labels (per rank, no gather).

    ``E = norm(C[targets])``, ``M = norm(f_r) E^T / temperature`` [N, N], positives ``P_ij = [t_i == t_j]``;
    ``loss_i = -log sum_j P_ij softmax(M_i)_j`` (probabilities of all positives summed, not averaged);
    result = mean over i. Computed as ``logsumexp(M_i over positives) - logsumexp(M_i)`` for stability.
    """
    if student_region_emb.shape[0] != targets.shape[0]:
        raise ValueError(f"{student_region_emb.shape[0]} regions but {targets.shape[0]} targets")
    if student_region_emb.shape[0] == 0:
        return student_region_emb.float().sum() * 0.0
    f = F.normalize(student_region_emb.float(), dim=-1)
    e = F.normalize(student_concept_emb.float()[targets], dim=-1)
    logits = f @ e.t() / temperature
    positives = targets[:, None] == targets[None, :]
    pos_lse = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos_lse).mean()


@torch.no_grad()
def clip_grad_norm_per_parameter_(parameters: Iterable[Tensor], max_norm: float,
                                  norm_type: float = 2.0) -> Optional[Tensor]:
    """Clip each parameter's gradient to norm ``max_norm`` separately (detectron2 ``CLIP_TYPE "norm"``).

    detectron2 calls ``torch.nn.utils.clip_grad_norm_(p, max_norm)`` for every parameter tensor on its own, so
    a large gradient in one tensor does not shrink the others (unlike a global-norm clip). The scale is
    ``min(1, max_norm / (norm + 1e-6))``, the same formula as ``clip_grad_norm_``.

    Returns:
        the per-parameter gradient norms before clipping ([P], float32; ``None`` if no parameter has a grad).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norms = []
    for p in parameters:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad.detach().float(), norm_type)
        p.grad.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0).to(p.grad.dtype))
        norms.append(n)
    return torch.stack(norms) if norms else None
