"""Inference speed paths: BN folding / channels_last / folded attnpool equal the unfused model within float
rounding; compute-dtype resolution from CPU capabilities; training keeps the unfused frozen-BN modules."""
from __future__ import annotations

import logging

import pytest
import torch

from regionclip.inference import hardware as runtime
from regionclip.modeling.clip_resnet import AttentionPool2d, ModifiedResNet
from regionclip.modeling.fusion import fused_for_inference
from regionclip.modeling.layers import FrozenBatchNorm2d, fold_frozen_bn


def _tiny_resnet(seed: int = 0) -> ModifiedResNet:
    """Width-8 ModifiedResNet with non-trivial frozen-BN statistics (identity BNs would hide folding bugs)."""
    torch.manual_seed(seed)
    m = ModifiedResNet((1, 2, 1, 2), 32, 2, 64, 8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, FrozenBatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.3, 2.0)
    return m.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("options", [{}, {"channels_last": False}, {"fold_attnpool_kv": False},
                                     {"channels_last": False, "fold_attnpool_kv": False}])
def test_fused_equals_unfused_within_rounding(options):
    m = _tiny_resnet()
    f = fused_for_inference(m, **options)
    x = torch.randn(2, 3, 70, 90)
    rois = torch.randn(5, 128, 4, 4)
    with torch.no_grad():
        res4, res4_f = m.forward_res4(x), f.forward_res4(x)
        res5, res5_f = m.layer4(rois), f.layer4(rois)
        emb, emb_f = m.attnpool(res5), f.attnpool(res5)
        img = torch.randn(2, 3, 64, 64)
        full, full_f = m.encode_image(img), f.encode_image(img)
    assert res4.shape == res4_f.shape and res5.shape == res5_f.shape and emb.shape == emb_f.shape
    assert _rel_err(res4_f, res4) < 1e-5
    assert _rel_err(res5_f, res5) < 1e-5
    assert _rel_err(emb_f, emb) < 1e-5
    assert _rel_err(full_f, full) < 1e-5
    assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in f.modules())  # every BN was folded
    assert f.fused and not m.fused  # fused_for_inference leaves the original alone
    assert any(isinstance(mod, FrozenBatchNorm2d) for mod in m.modules())


def test_folded_attnpool_matches_sdpa_path():
    torch.manual_seed(1)
    pool = AttentionPool2d(3, 32, 4, 8).eval()
    x = torch.randn(6, 32, 3, 3) * 3.0
    with torch.no_grad():
        ref = pool(x)
        pool.fold_kv = True
        ours = pool(x)
        ours_cl = pool(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_cl, ref, rtol=1e-5, atol=1e-6)


def test_fold_frozen_bn_is_bn_of_conv():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = FrozenBatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
    x = torch.randn(2, 4, 5, 5)
    fused = fold_frozen_bn(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert not fused.weight.requires_grad and not fused.bias.requires_grad


def test_training_keeps_unfused_modules_and_fused_refuses_training():
    m = _tiny_resnet()
    keys = list(m.state_dict())
    f = fused_for_inference(m)
    # the original is untouched: same checkpoint keys, frozen BNs still modules, trainable convs, train() works
    assert list(m.state_dict()) == keys
    m.train()
    assert m.training and isinstance(m.layer1[0].bn1, FrozenBatchNorm2d)
    assert m.layer1[0].conv1.weight.requires_grad
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()  # gradients flow through the frozen-BN (affine) branch
    assert m.layer4[0].conv1.weight.grad is not None
    with pytest.raises(RuntimeError, match="fused for inference"):
        f.train()
    assert not f.training
    f.eval()  # eval stays allowed
    assert all(not p.requires_grad for p in f.parameters())
    assert "layer1.0.bn1.running_var" not in f.state_dict()  # fused keys differ: never save a fused model


def test_fused_model_is_channels_last():
    f = fused_for_inference(_tiny_resnet())
    with torch.no_grad():
        res5 = f.layer4(torch.randn(3, 128, 4, 4))
    assert res5.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- runtime
def _caps(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_capabilities", lambda: {"bf16_native": native})
    monkeypatch.setattr(runtime, "_warned", set())


def test_resolve_dtype_cpu_auto(monkeypatch):
    _caps(monkeypatch, False)
    assert runtime.resolve_dtype("auto", "cpu") == "float32"
    assert runtime.resolve_dtype("float32", "cpu") == "float32"
    _caps(monkeypatch, True)
    # no 16-bit path is both within the agreement bar and faster (docs/DESIGN.md#trusted-bf16): auto stays float32
    assert not runtime.AUTO_16BIT
    assert runtime.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(runtime, "AUTO_16BIT", True)
    assert runtime.resolve_dtype("auto", "cpu") == "bfloat16"


def test_resolve_dtype_explicit_bf16_warns_once_when_emulated(monkeypatch, caplog):
    _caps(monkeypatch, False)
    with caplog.at_level(logging.WARNING, logger="regionclip.inference.hardware"):
        assert runtime.resolve_dtype("bfloat16", "cpu") == "bfloat16"
        assert runtime.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    msgs = [r.getMessage() for r in caplog.records if r.name == "regionclip.inference.hardware"]
    assert len(msgs) == 1 and "emulated" in msgs[0] and runtime.EMULATED_BF16_SLOWDOWN in msgs[0]
    _caps(monkeypatch, True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regionclip.inference.hardware"):
        assert runtime.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert not caplog.records


def test_resolve_dtype_rejects_bad_requests(monkeypatch):
    _caps(monkeypatch, True)
    with pytest.raises(ValueError, match="float16 compute is for GPUs"):
        runtime.resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        runtime.resolve_dtype("half", "cpu")


def test_resolve_dtype_cuda_auto(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.resolve_dtype("auto", "cuda") == "float32"  # AUTO_16BIT is False (measured)
    monkeypatch.setattr(runtime, "AUTO_16BIT", True)
    assert runtime.resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.resolve_dtype("auto", "cuda") == "float16"


def test_cpu_capabilities_respects_onednn_cap(monkeypatch):
    flags = {"avx2", "fma", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(runtime, "_read_cpuinfo_flags", lambda path="/proc/cpuinfo": flags)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert runtime.cpu_capabilities()["bf16_native"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    caps = runtime.cpu_capabilities()
    assert caps["avx512_bf16"] and not caps["bf16_native"] and caps["onednn_max_isa"] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert runtime.cpu_capabilities()["bf16_native"]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not runtime.cpu_capabilities()["bf16_native"]
    monkeypatch.setattr(runtime, "_read_cpuinfo_flags", lambda path="/proc/cpuinfo": {"avx2", "fma"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert not runtime.cpu_capabilities()["bf16_native"]


def test_cpu_capabilities_arm_and_unreadable(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(runtime, "_read_cpuinfo_flags", lambda path="/proc/cpuinfo": {"asimd", "bf16", "sve"})
    caps = runtime.cpu_capabilities()
    assert caps["bf16"] and caps["sve"] and caps["bf16_native"]
    monkeypatch.setattr(runtime, "_read_cpuinfo_flags", lambda path="/proc/cpuinfo": set())  # e.g. macOS
    assert not runtime.cpu_capabilities()["bf16_native"]
    assert "native bf16: no" in runtime.cpu_flags_line()


def test_unreadable_cpuinfo_gives_empty_flags(tmp_path):
    assert runtime._read_cpuinfo_flags(str(tmp_path / "missing")) == set()
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags : fpu avx2 fma\n")
    assert runtime._read_cpuinfo_flags(str(tmp_path / "cpuinfo")) == {"fpu", "avx2", "fma"}
