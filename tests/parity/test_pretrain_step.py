"""One region-text pretraining step against the original's (``fixtures/pretrain_step.pt``, written by
``scripts/fixtures/make_pretrain_step.py`` from the original ``PretrainFastRCNN`` with its
``create_global_proposals`` bug patched to the intended whole-image boxes).

Same inputs through the code ``regionclip pretrain`` runs (:func:`regionclip.engine.pretrain.build_pretrainer` ->
:class:`regionclip.modeling.pretrainer.RegionTextPretrainer`): seed-0 random RegionCLIP checkpoint as student (and
text encoder), the seed-0 random R50-FPN RPN (NMS 0.5, 300 proposals), two small images, two captions, random
1024-concept pools; teacher = student, and a perturbed teacher with its own concept pool. Compared: RPN proposals,
the sampled regions (our ``torch.Generator`` seeded 0 must draw the original's ``randperm``), whole-image boxes,
caption / whole-image / region embeddings, the teacher's pseudo labels, the three losses, full gradients of five
parameters, the gradient norm of every trainable parameter and the trainable set. Tolerances: docs/PRETRAINING.md
("Fidelity"), from the differences measured with the default and the AVX2 kernels.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _compare import BOX_ATOL, diff_stats
from _fixture_rules import perturbed_teacher
from _train_compare import check_grads, check_losses, check_rel
from torch import Tensor

from regionclip.data.captions import CaptionSample
from regionclip.engine.pretrain import ConceptSection, PretrainConfig, PretrainModelSection, build_pretrainer
from regionclip.modeling.pretrainer import RegionTextConfig

pytestmark = [pytest.mark.parity, pytest.mark.slow]  # ~2 min per case on 2 idle cores (teacher + student, 64 regions)
FIXTURE = Path(__file__).parent / "fixtures" / "pretrain_step.pt"

# Tolerances (scale-relative: max |ours - original| / max |original|), ~10x the largest difference measured with the
# default and the AVX2 kernels (docs/PRETRAINING.md#fidelity), rounded up.
EMB_REL = 1e-4  # caption / whole-image / region embeddings: measured <= 2.2e-6
LOSS_REL, LOSS_ATOL = 2e-4, 1e-6  # losses: measured <= 7.7e-7 relative (2.0e-5 with an earlier 16-concept fixture);
# ATOL: the distillation loss is ~0 when teacher = student
PROB_ATOL = 1e-4  # teacher concept probabilities (softmax of cos / 0.01): measured <= 9.5e-6
GRAD_REL = 1e-3  # every per-parameter gradient norm (relative) and the attnpool's full gradients: measured <= 9.9e-5
# Full gradients of early convs collect the AVX2 rounding of the whole backward, amplified by the 1/0.01 of all three
# losses: measured <= 5.2e-4 (layer3) and 2.9e-3 (layer2); with teacher = student 3.1e-3 (4.0e-3 with an earlier
# fixture), where the distillation gradient (s - q) / 0.01 compares two softmaxes that are equal up to rounding.
EARLY_GRAD_REL = {"same_teacher": 5e-2, "other_teacher": 3e-2}
EARLY_LAYERS = ("backbone.layer2.", "backbone.layer3.")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def concept_pool(seed: int, n: int) -> Tensor:
    return torch.randn(n, 1024, generator=torch.Generator().manual_seed(seed))


def run_our_step(case: str, fx: dict, ckpts: dict[str, Path], tmp: Path) -> dict:
    """Build the pretrainer for ``case`` as ``regionclip pretrain`` does and run one forward/backward."""
    torch.save(concept_pool(2, fx["num_concepts"]), tmp / "pool.pth")
    concepts = ConceptSection(pool=str(tmp / "pool.pth"))
    teacher = None
    if case == "other_teacher":
        torch.save(concept_pool(3, fx["num_concepts"]), tmp / "tpool.pth")
        concepts = ConceptSection(pool=str(tmp / "pool.pth"), teacher_pool=str(tmp / "tpool.pth"))
        sd = torch.load(ckpts["regionclip"], map_location="cpu", weights_only=True)["model"]
        student = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        teacher = tmp / "teacher.pth"
        torch.save({"model": {"backbone." + k: v for k, v in perturbed_teacher(student).items()}}, teacher)
    cfg = PretrainConfig(
        model=PretrainModelSection(clip_weights=str(ckpts["regionclip"]), rpn_weights=str(ckpts["rpn"]),
                                   teacher_weights=None if teacher is None else str(teacher)),
        concepts=concepts, pretrain=RegionTextConfig(num_regions=fx["sample_regions"]))
    task = build_pretrainer(cfg)
    rec: dict = {"encode": []}
    student, orig_encode = task.student, task.student.encode_regions
    orig_teacher_encode, orig_captions = task.teacher.encode_regions, task.encode_captions
    task.offline_rpn.register_forward_hook(lambda m, i, out: rec.update(proposals=[p.boxes.clone() for p in out]))

    def encode(res4, boxes, **kw):
        out = orig_encode(res4, boxes, **kw)
        rec["encode"].append(([b.clone() for b in boxes], out[0].detach().clone()))
        return out

    def teacher_encode(res4, boxes, **kw):
        out = orig_teacher_encode(res4, boxes, **kw)
        rec["teacher_emb"] = out[0].clone()
        return out

    def captions(tokens):
        rec["text_emb"] = orig_captions(tokens)
        return rec["text_emb"]

    student.encode_regions = encode
    task.teacher.encode_regions, task.encode_captions = teacher_encode, captions
    batch = [CaptionSample(img, tok, cap, str(i))
             for i, (img, tok, cap) in enumerate(zip(fx["images"], fx["tokens"], fx["captions"]))]
    task.train()
    losses = task(batch, generator=torch.Generator().manual_seed(0))
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    rec["losses"] = {k: float(v.detach()) for k, v in losses.items() if k.startswith("loss")}
    rec["grads"] = {"backbone." + n: p.grad for n, p in task.student.backbone.named_parameters() if p.grad is not None}
    rec["trainable"] = sorted(n for n, p in task.named_parameters() if p.requires_grad)
    rec["teacher_pool"] = task.teacher_concept_embeddings
    return rec


@pytest.mark.parametrize("case", ["same_teacher", "other_teacher"])
def test_pretrain_step_matches_original(case: str, fixture: dict, rn50_ckpts: dict[str, Path], tmp_path: Path):
    ref = fixture["cases"][case]
    ours = run_our_step(case, fixture, rn50_ckpts, tmp_path)
    report: dict = {}
    failures: list[str] = []

    # offline RPN proposals and the sampled regions (the same randperm: a Generator seeded 0 = the original's
    # torch.manual_seed(0) global stream)
    for i, (p, rp) in enumerate(zip(ours["proposals"], ref["rpn_proposals"])):
        assert p.shape == rp["boxes"].shape, f"image {i}: {len(p)} proposals, original {len(rp['boxes'])}"
        d, _ = diff_stats(p, rp["boxes"])
        assert d <= BOX_ATOL, f"image {i}: proposals differ by {d:.3g} px"
        g = torch.Generator().manual_seed(0)
        for _ in range(i):
            torch.randperm(len(ref["rpn_proposals"][_]["boxes"]), generator=g)
        perm = torch.randperm(len(p), generator=g)[:fixture["sample_regions"]]
        assert torch.equal(perm, ref["sampled_idxs"][i].long()), f"image {i}: sampled regions differ"
    (whole, global_emb), (regions, region_emb) = ours["encode"]
    for i, (b, rb) in enumerate(zip(regions, ref["sampled_boxes"])):
        d, _ = diff_stats(b, rb)
        assert d <= BOX_ATOL, f"image {i}: sampled boxes differ by {d:.3g} px"
    for i, (b, rb) in enumerate(zip(whole, ref["global_boxes"])):
        assert torch.equal(b.cpu(), rb), f"image {i}: whole-image box {b.tolist()} != original {rb.tolist()}"

    check_rel("caption embeddings", ours["text_emb"], ref["text_emb"], EMB_REL, report, failures)
    check_rel("whole-image embeddings", global_emb, ref["global_feats"], EMB_REL, report, failures)
    check_rel("region embeddings[:8]", region_emb[:8], ref["region_feats_first8"], EMB_REL, report, failures)
    check_rel("region embedding norms", region_emb.norm(dim=-1), ref["region_feats_norm"], EMB_REL, report, failures)

    # teacher pseudo labels: the kept set and targets exactly, probabilities to float noise
    from regionclip.losses.region_text import teacher_pseudo_labels

    labels = teacher_pseudo_labels(ours["teacher_emb"], ours["teacher_pool"], 0.01, 0.1)
    assert torch.equal(labels.keep, ref["keep"]), "kept regions differ"
    assert torch.equal(labels.targets[labels.keep], ref["target_inds"]), "pseudo-label targets differ"
    d, _ = diff_stats(labels.probs[labels.keep], ref["teacher_concept_scores_kept"])
    report["teacher probabilities (abs)"] = d
    assert d <= PROB_ATOL, f"teacher probabilities differ by {d:.3g}"

    check_losses(ours["losses"], ref["losses"], LOSS_REL, LOSS_ATOL, report, failures)

    # trainable set: the student backbone minus stem and res2 (FREEZE_AT 2); nothing of teacher / text / RPN
    ref_trainable = sorted(ref["requires_grad"])
    assert sorted("backbone." + n.split("backbone.", 1)[1] for n in ours["trainable"]) == ref_trainable
    early = {n: EARLY_GRAD_REL[case] for n in ref["grads_full"] if n.startswith(EARLY_LAYERS)}
    check_grads(ours["grads"], ref["grad_norms"], ref["grads_full"], GRAD_REL, report, failures, full_tol=early)
    print(case, {k: f"{v:.2e}" for k, v in report.items()})
    assert not failures, "\n".join(failures)
