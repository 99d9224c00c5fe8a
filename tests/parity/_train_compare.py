"""Comparisons of one training step with the original's fixture (tests/parity/test_train_lvis_step.py,
test_pretrain_step.py): every difference is recorded in ``report`` and every violation collected in ``failures``,
so one run shows all of them (the tests assert ``failures`` is empty at the end)."""
from __future__ import annotations

from typing import Mapping, Optional

from _compare import diff_stats
from torch import Tensor


def check_rel(name: str, ours: Tensor, ref: Tensor, tol: float, report: dict, failures: list) -> None:
    """Scale-relative difference ``max |ours - ref| / max |ref|`` <= ``tol``."""
    _, rel = diff_stats(ours, ref)
    report[name] = rel
    if not rel <= tol:
        failures.append(f"{name}: scale-relative difference {rel:.3g} > {tol:g}")


def check_losses(ours: Mapping[str, float], ref: Mapping[str, float], rtol: float, atol: float, report: dict,
                 failures: list) -> None:
    """Same loss names; ``|ours - ref| <= atol + rtol |ref|`` (``atol`` for losses that are ~0, e.g. the
    distillation loss when the teacher is the student)."""
    if set(ours) != set(ref):
        failures.append(f"loss names {sorted(ours)} != original {sorted(ref)}")
    for k, v in ref.items():
        if k not in ours:
            continue
        d = abs(ours[k] - v)
        report[k] = d / abs(v) if abs(v) > atol else d
        if not d <= atol + rtol * abs(v):
            failures.append(f"{k}: ours {ours[k]:.8g}, original {v:.8g} (|diff| {d:.3g})")


def check_grads(ours: Mapping[str, Tensor], norms: Mapping[str, float], full: Mapping[str, Tensor], tol: float,
                report: dict, failures: list, floor: float = 1e-6,
                full_tol: Optional[Mapping[str, float]] = None) -> None:
    """The same parameters have a gradient; each one's L2 norm agrees to ``tol`` relative; the full gradients
    agree to ``full_tol[name]`` (default ``tol``) scale-relative.

    ``floor`` (relative to the global gradient norm) is the size below which a gradient is rounding noise of a
    zero: the attnpool's ``k_proj.bias`` shifts every attention logit of a query by the same amount, which the
    softmax cancels, so its exact gradient is 0 and both sides hold ~1e-7 of noise. Such norms are compared
    absolutely, ``|ours - ref| <= floor * global norm``."""
    global_norm = sum(v * v for v in norms.values()) ** 0.5
    atol = floor * global_norm
    if set(ours) != set(norms):
        failures.append(f"parameters with a gradient differ: only ours {sorted(set(ours) - set(norms))[:5]}, only "
                        f"the original's {sorted(set(norms) - set(ours))[:5]}")
    worst, worst_name = 0.0, ""
    for name, norm in norms.items():
        if name not in ours:
            continue
        ours_norm = float(ours[name].double().norm())
        rel = abs(ours_norm - norm) / max(norm, 1e-30)
        if norm < atol:
            report[f"grad norm of {name} (noise of a zero gradient, abs)"] = abs(ours_norm - norm)
            rel = 0.0
        if rel > worst:
            worst, worst_name = rel, name
        if not (rel <= tol or abs(ours_norm - norm) <= atol):
            failures.append(f"grad norm of {name}: ours {ours_norm:.6g}, original {norm:.6g} (relative {rel:.3g})")
    report[f"grad norms (max rel, {worst_name})"] = worst
    for name, g in full.items():
        check_rel(f"grad {name}", ours[name], g, (full_tol or {}).get(name, tol), report, failures)
