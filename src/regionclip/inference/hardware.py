"""What this machine computes fast: CPU instruction sets, native bfloat16, compute-dtype resolution, GEMM peak.

``resolve_dtype("auto", device)`` picks reduced precision only where the hardware runs it natively (it pays there);
everywhere else reduced precision is emulated and slower than float32, so "auto" stays float32 and an explicit
``bfloat16`` request on such a CPU is honoured with one warning (measurements: benchmarks/results/fusion_steps_cpu.txt).

Native bfloat16 on a CPU means dot-product instructions that take bf16 operands:

* x86: AVX512_BF16 (``avx512_bf16``: Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later) or AMX
  (``amx_bf16``: Sapphire Rapids and later). oneDNN (convolutions, GEMMs) uses them unless ``ONEDNN_MAX_CPU_ISA``
  (or ``DNNL_MAX_CPU_ISA``) caps the ISA below ``AVX512_CORE_BF16``; ATen's own kernels (softmax, adds, pooling)
  vectorise bf16 only with the AVX512 capability, so ``ATEN_CPU_CAPABILITY=avx2``/``default`` also counts as
  "not native". Without these, bf16 arithmetic converts to float32 and back around every op (emulation).
* aarch64: the Armv8.6 ``bf16`` feature (BFDOT/BFMMLA; Graviton 3+, Neoverse V1/N2, Apple M2+) in
  /proc/cpuinfo ``Features``. Not detectable elsewhere (macOS, Windows): treated as not native.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import time
from typing import Any, Optional, Union

import torch

from ..text.embeddings import TEXT_DTYPES
from ..utils import COMPUTE_DTYPES

__all__ = ["cpu_capabilities", "native_bf16", "resolve_dtype", "gemm_peak_gflops", "cpu_flags_line",
           "REQUESTABLE_DTYPES", "EMULATED_BF16_SLOWDOWN", "AUTO_16BIT", "TEXT_AUTO_BF16", "resolve_text_dtype"]

logger = logging.getLogger(__name__)

REQUESTABLE_DTYPES = ("auto", *COMPUTE_DTYPES)  # "auto" resolves to one of the compute dtypes (resolve_dtype)

# Measured on an AVX2-only AMD EPYC (Zen 3): RN50 region head (layer4 + attnpool, 32 regions, 1-thread CPU time),
# bf16 autocast vs float32 on the fused channels_last model: 265 vs 39 ms/region (6.7x); the unfused NCHW model
# in bf16 was far worse (1465 ms/region, ~32x its float32 time): NCHW bf16 convolutions take a much slower path.
EMULATED_BF16_SLOWDOWN = "~7x"

# oneDNN ISA names in increasing order (the documented ONEDNN_MAX_CPU_ISA values); bf16 dot products need
# AVX512_CORE_BF16 or a later entry
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")
_X86_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
_ARM_FLAGS = ("asimd", "bf16", "sve", "sve2", "i8mm")


def _read_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first ``flags`` (x86) or ``Features`` (aarch64) line of /proc/cpuinfo; empty where unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _onednn_isa_allows_bf16(cap: Optional[str]) -> bool:
    """False if ONEDNN_MAX_CPU_ISA caps oneDNN below AVX512_CORE_BF16 (unknown values: not restricting)."""
    if not cap:
        return True
    cap = cap.strip().upper()
    if cap not in _ONEDNN_ISAS:
        return True
    return _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")


def cpu_capabilities() -> dict[str, Any]:
    """This CPU's relevant features, as the running process may use them.

    Returns a dict: ``machine`` (``platform.machine()``), ``torch_capability`` (ATen's dispatch level, which
    honours ``ATEN_CPU_CAPABILITY``), ``onednn_max_isa`` (the env cap or None), one bool per flag of interest
    (x86: avx2, fma, avx512f, avx512_bf16, avx512_fp16, amx_bf16, amx_tile; aarch64: asimd, bf16, sve, sve2,
    i8mm; False where /proc/cpuinfo is absent), ``threads`` (torch intra-op threads) and ``bf16_native`` (see the
    module docstring for the rule).
    """
    machine = platform.machine().lower()
    try:
        torch_cap = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # very old torch / exotic builds
        torch_cap = "unknown"
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    flags = _read_cpuinfo_flags()
    caps: dict[str, Any] = {"machine": machine, "torch_capability": torch_cap, "onednn_max_isa": onednn_cap,
                            "threads": torch.get_num_threads()}
    is_arm = machine in ("aarch64", "arm64")
    for name in _ARM_FLAGS if is_arm else _X86_FLAGS:
        caps[name] = name in flags
    if is_arm:
        native = caps["bf16"]
    else:
        hw = caps.get("avx512_bf16", False) or caps.get("amx_bf16", False)
        aten_ok = torch_cap.upper().startswith("AVX512")
        native = hw and aten_ok and _onednn_isa_allows_bf16(onednn_cap)
    caps["bf16_native"] = bool(native)
    return caps


def cpu_flags_line(caps: Optional[dict[str, Any]] = None) -> str:
    """One human-readable line of :func:`cpu_capabilities` (benchmarks, logs)."""
    caps = caps if caps is not None else cpu_capabilities()
    on = [k for k, v in caps.items() if v is True and k != "bf16_native"]
    return (f"cpu: {caps['machine']}, torch capability {caps['torch_capability']}, threads {caps['threads']}, "
            f"flags [{' '.join(on) or '-'}], ONEDNN_MAX_CPU_ISA={caps['onednn_max_isa'] or 'unset'}, "
            f"native bf16: {'yes' if caps['bf16_native'] else 'no'}")


def native_bf16(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether bfloat16 compute is native (fast) on ``device``: CUDA asks the driver
    (``torch.cuda.is_bf16_supported``: Ampere and later); CPU follows :func:`cpu_capabilities`; others: False."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool(cpu_capabilities()["bf16_native"])
    return False


_warned: set[str] = set()

# Whether "auto" may pick a 16-bit dtype on hardware that runs it natively. False, measured (docs/DESIGN.md#trusted-bf16,
# benchmarks/bf16_stages.py: RN50, demo images, lvis-rpn, 1000 proposals): the plain 16-bit head misses the agreement
# bar (98.7 % of the float32 detections on one image, 87-92 % from the same proposal), and the trusted path meets it
# (100 %) only by encoding every proposal again in float32 there - slower than float32 alone. So the fastest path
# that meets the bar is float32; set True once a 16-bit path meets it and is faster (then "auto" is as documented
# in resolve_dtype).
AUTO_16BIT = False


def resolve_dtype(requested: str, device: Union[str, torch.device] = "cpu") -> str:
    """The compute dtype to run the region head in: one of "float32", "bfloat16", "float16".

    A 16-bit dtype is the *trusted* reduced-precision path (docs/DESIGN.md#cpu-speed): only the stages in
    :data:`regionclip.modeling.detector.BF16_STAGES` run in 16 bits, and the regions whose float32 result could
    change the detections are encoded again in float32 (:mod:`regionclip.inference.precision`, ``RunOptions.refine_float32``), so it reports float32's
    detections (measured 100 %, benchmarks/bf16_stages.py). That is what would make it eligible for ``"auto"``;
    it is not picked while it is slower than float32 (:data:`AUTO_16BIT`).

    ``"auto"``: "float32" while :data:`AUTO_16BIT` is False (no 16-bit path is both within the agreement bar and
    faster, measured); with it True: CUDA -> "bfloat16" where supported, else "float16"; CPU -> "bfloat16" only
    with native support (:func:`native_bf16`), else "float32" (emulated bf16 is slower than float32); other
    devices -> "float32". Explicit dtypes are returned as asked;
    "bfloat16" on a CPU without native support logs one warning (per process) that it is emulated and typically
    slower; "float16" on a CPU is rejected (CPU autocast runs float16 as emulation only).
    """
    if requested not in REQUESTABLE_DTYPES:
        raise ValueError(f"dtype must be one of {REQUESTABLE_DTYPES}, got {requested!r}")
    dev = torch.device(device)
    if requested == "auto":
        if not AUTO_16BIT:
            return "float32"
        if dev.type == "cuda":
            return "bfloat16" if native_bf16(dev) else "float16"
        if dev.type == "cpu" and native_bf16(dev):
            return "bfloat16"
        return "float32"
    if dev.type == "cpu" and requested == "float16":
        raise ValueError("float16 compute is for GPUs; on the CPU use dtype 'bfloat16' (fast only with AVX512_BF16/"
                         "AMX or Arm BF16) or 'float32' (or 'auto' to pick)")
    if dev.type == "cpu" and requested == "bfloat16" and not native_bf16(dev) and "cpu-bf16" not in _warned:
        _warned.add("cpu-bf16")
        logger.warning("bfloat16 is emulated on this CPU (no AVX512_BF16/AMX/Arm BF16, or capped by "
                       "ONEDNN_MAX_CPU_ISA/ATEN_CPU_CAPABILITY) and typically %s slower than float32; "
                       "use dtype 'auto' or 'float32'", EMULATED_BF16_SLOWDOWN)
    return requested


# Regions per region-head call when the user does not choose (RunOptions.chunk_size=None). CPU: 64 - with a chunk
# of 32-64 the layer4 activations (~2 MB/region for RN50) stay in the last-level cache between the convs of a
# block; measured on the AVX2 team machine (fused RN50 head, float32, 2 threads, interleaved): chunk 32/64 19.8/19.7
# ms per region, 128/256 22.1/22.5 (docs/DESIGN.md#cpu-speed). Accelerators: 256 (unchanged: not re-measured).
CPU_CHUNK_SIZE = 64
ACCELERATOR_CHUNK_SIZE = 256


def default_chunk_size(device: Union[str, torch.device]) -> int:
    """The region-head chunk size used when none is given (see CPU_CHUNK_SIZE); never changes a result."""
    return CPU_CHUNK_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_SIZE


@functools.lru_cache(maxsize=None)
def gemm_peak_gflops(dtype: torch.dtype = torch.float32, threads: Optional[int] = None) -> float:
    """Measured matmul throughput of this CPU in GFLOP/s: a large square ``torch.mm`` (n up to 2048), best of
    several runs within ~1.5 s. ``threads``: intra-op threads for the measurement (default: torch's current).

    Cached per (dtype, threads) for the process. A lower bound of the peak on a busy machine.
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        n, best = 256, 0.0
        while True:  # grow n until one product takes >= 50 ms (or n = 2048): small ones under-use the cores
            a = torch.randn(n, n, generator=gen).to(dtype)
            b = torch.randn(n, n, generator=gen).to(dtype)
            torch.mm(a, b)  # warm-up: thread pool, packing buffers
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t0
            if dt >= 0.05 or n >= 2048:
                break
            n *= 2
        deadline = time.perf_counter() + 1.5
        best = dt
        for _ in range(20):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(old)


# Whether dtype "auto" may pick bfloat16 for the text tower on native hardware. False: on the shared 2-core
# AVX512-BF16 machine (load 9-11) float32 did 0.66 names/s and bfloat16 0.55 (benchmarks/text_embeddings.py,
# 30 names): the bf16 GEMMs are ~2.5x faster there, but the packed-prefix attention, gathers and mixed-dtype adds
# around them are not. Set True once an idle-machine run shows bfloat16 faster.
TEXT_AUTO_BF16 = False


def resolve_text_dtype(requested: str, device: Union[str, torch.device] = "cpu") -> str:
    """The text tower's compute dtype (one of :data:`regionclip.text.embeddings.TEXT_DTYPES`): "auto" ->
    "bfloat16" where the device runs it natively (:func:`native_bf16`: AVX512_BF16/AMX/Arm BF16 CPUs, Ampere+
    GPUs) and :data:`TEXT_AUTO_BF16` is set, else "float32"; explicit dtypes as asked.

    bfloat16 here meets the agreement bar (unlike the detector's, docs/DESIGN.md#trusted-bf16): the residual
    stream and LayerNorms stay float32, and the 81-template mean of each name agrees with float32 to cosine
    >= 0.9999 (measured min 0.999985 on 30 LVIS names, seed-0 RN50 tower; tests/test_text_encoder.py checks it).
    It was not measured faster yet (see :data:`TEXT_AUTO_BF16`), so "auto" stays float32 for now."""
    if requested not in ("auto", *TEXT_DTYPES):
        raise ValueError(f"dtype must be one of {('auto', *TEXT_DTYPES)}, got {requested!r}")
    if requested == "auto":
        return "bfloat16" if TEXT_AUTO_BF16 and native_bf16(device) else "float32"
    return requested
