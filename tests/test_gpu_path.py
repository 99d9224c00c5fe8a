"""The ``--device cuda`` code path, checked without a GPU (CI has none).

What a CPU machine can honestly exercise of the GPU path, in four groups:

1. Decisions that only *read* the device: ``resolve_dtype("auto", "cuda")`` (driver answer monkeypatched),
   ``autocast_context("cuda", ...)``, ``rank_device`` under torchrun, float16 refused on the CPU with a clear error.
2. Shapes and dtypes of the full-size RN50 / RN50x4 region head on the ``meta`` device (no memory, no values):
   res4 stride, RoIAlign size, layer4 + attnpool widths, float16 in -> float16 out. ``torch.autocast`` does not
   support ``meta``, so the 16-bit meta checks use a ``.half()`` model; autocast itself is group 3.
3. The autocast data flow with real values on the CPU: ``torch.autocast("cpu", float16 / bfloat16)`` runs the same
   Python code as CUDA autocast (only the kernels differ). The pipeline refuses float16 on the CPU on purpose (it is
   emulated there), so :func:`cpu_float16_autocast` lifts that guard to reproduce the CUDA float16 flow.
4. What none of this covers: CUDA kernels (cuDNN convolutions, CUDA roi_align / nms), NCCL, cuda:N placement of
   tensors, GPU memory. Those need a GPU run (benchmarks/dtype_accuracy.py --device cuda --dtype float16,
   benchmarks/benchmark.py --device cuda --quick).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import pytest
import torch

import regionclip.modeling.detector as detector_mod
import regionclip.pipeline as pipeline_mod
from _region_helpers import TINY_CLIP, TINY_RPN, tiny_options, tiny_pipeline, tiny_vocab
from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig
from regionclip.parallel.distributed import DistInfo, init_distributed
from regionclip.factory import build_detector
from regionclip.modeling.detector import RegionCLIPDetector
from regionclip.modeling.fusion import fused_for_inference
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.inference.hardware import resolve_dtype
from regionclip.parallel.sharding import rank_device
from regionclip.utils import autocast_context

CPU = torch.device("cpu")


def _image(h: int = 100, w: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- 1. device decisions
def test_float16_on_cpu_is_refused_with_a_clear_error() -> None:
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"float16.*GPU.*bfloat16"):
        pipe.detect([_image()], tiny_vocab(), tiny_options(dtype="float16"), boxes=[[[10, 10, 60, 70]]])
    with pytest.raises(ValueError, match=r"float16.*GPU"):
        pipe.features([pipe.prepare(_image())], RunOptions(dtype="float16"))
    with pytest.raises(ValueError, match=r"float16.*GPU.*bfloat16"):
        resolve_dtype("float16", "cpu")


def test_autocast_context_for_cuda_is_a_float16_cuda_autocast() -> None:
    # constructing a CUDA autocast without CUDA only warns (it is then disabled); its settings are what we check
    with pytest.warns(UserWarning, match="CUDA is not available"):
        ctx = autocast_context("cuda:1", "float16")
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.float16
    assert isinstance(autocast_context("cuda", "float32"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_context("cuda", "half")


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bfloat16"), (False, "float16")])
def test_resolve_dtype_auto_on_cuda_asks_the_driver(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                     bf16_supported: bool, expected: str) -> None:
    calls: list[int] = []

    def is_bf16_supported(*_: Any, **__: Any) -> bool:
        calls.append(1)
        return bf16_supported

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    import regionclip.inference.hardware as rt

    assert resolve_dtype("auto", "cuda") == "float32"  # no 16-bit path meets the agreement bar faster (measured)
    monkeypatch.setattr(rt, "AUTO_16BIT", True)  # the device decision itself, as it applies once one does
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", torch.device("cuda", 1)) == expected
    assert calls, "resolve_dtype('auto', 'cuda') must ask torch.cuda.is_bf16_supported"
    with caplog.at_level(logging.WARNING, logger="regionclip.inference.hardware"):
        assert resolve_dtype("float16", "cuda:0") == "float16"  # allowed on GPUs
        assert resolve_dtype("bfloat16", "cuda") == "bfloat16"
        assert resolve_dtype("float32", "cuda") == "float32"
    assert not caplog.records, "explicit dtypes on CUDA must not warn (the emulation warning is CPU-only)"


def test_rank_device_maps_cuda_to_the_local_rank() -> None:
    assert rank_device("cuda", DistInfo(1, 2, 1, CPU)) == "cuda:1"
    assert rank_device("cuda", DistInfo(5, 8, 1, CPU)) == "cuda:1"  # second node: LOCAL_RANK, not RANK
    assert rank_device("cuda", DistInfo(0, 1, 0, CPU)) == "cuda"  # one process: unchanged
    assert rank_device("cpu", DistInfo(1, 2, 1, CPU)) == "cpu"


def test_init_distributed_cuda_without_cuda_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        init_distributed("cuda")
    assert init_distributed("cpu") == DistInfo(0, 1, 0, CPU)


# ------------------------------------------------------------------------------------------- 2. meta-device shapes
@pytest.fixture(scope="module", params=["rn50", "rn50x4"])
def meta_detector(request: pytest.FixtureRequest) -> tuple[RegionCLIPDetector, ClipResNetConfig]:
    """A full-size, fused (the inference path) detector whose parameters live on ``meta`` (no memory, no values)."""
    clip = ClipResNetConfig() if request.param == "rn50" else ClipResNetConfig.rn50x4()
    with torch.device("meta"):
        det = build_detector(DetectorConfig(clip=clip)).eval()
    assert isinstance(det, RegionCLIPDetector)
    return fused_for_inference(det), clip


def test_meta_full_size_region_head_shapes(meta_detector: tuple[RegionCLIPDetector, ClipResNetConfig]) -> None:
    det, clip = meta_detector
    images = [torch.empty(3, 750, 1333, dtype=torch.uint8, device="meta"),
              torch.empty(3, 704, 1333, dtype=torch.uint8, device="meta")]
    with torch.no_grad():
        res4 = det.compute_features(images)
        # padded batch 750x1333 -> res4 at stride 16 (the stem and each stage floor-divide)
        assert res4.shape == (2, clip.res4_channels, 46, 83) and res4.device.type == "meta"
        boxes = [torch.empty(3, 4, device="meta"), torch.empty(0, 4, device="meta")]
        emb, res5 = det.encode_regions(res4, boxes, chunk_size=2, return_res5=True)
    grid = clip.attnpool_grid  # RoIAlign pools 2 * grid; layer4 halves it
    assert emb.shape == (3, clip.embed_dim) and emb.dtype == torch.float32
    assert res5 is not None and res5.shape == (3, clip.res5_channels, grid, grid)


def test_meta_float16_region_head_keeps_float16(meta_detector: tuple[RegionCLIPDetector, ClipResNetConfig]) -> None:
    """layer4 + attnpool of a float16 model: float16 in, float16 out (the dtypes CUDA float16 work feeds them)."""
    det, clip = meta_detector
    s = clip.pooler_resolution
    det.to(torch.float16)
    try:
        with torch.no_grad():
            pooled = torch.empty(5, clip.res4_channels, s, s, device="meta", dtype=torch.float16)
            out = det.backbone.attnpool(det.backbone.layer4(pooled))
            res4 = torch.empty(1, clip.res4_channels, 46, 83, device="meta", dtype=torch.float16)
            emb, _ = det.encode_regions(res4, [torch.empty(5, 4, device="meta")], chunk_size=2)
    finally:
        det.to(torch.float32)  # the fixture is module-scoped (meta: there are no values to lose)
    assert out.shape == (5, clip.embed_dim) and out.dtype == torch.float16
    assert emb.shape == (5, clip.embed_dim) and emb.dtype == torch.float16


# ------------------------------------------------------------------------------------------- 3. autocast values
@contextlib.contextmanager
def cpu_float16_autocast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let the pipeline run ``dtype="float16"`` on the CPU (CPU autocast supports float16, slowly) so the CUDA
    float16 data flow (which tensors become float16 where) runs with real values here."""

    def ctx(device: Any, dtype: str) -> contextlib.AbstractContextManager:
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))

    monkeypatch.setattr(pipeline_mod, "autocast_context", ctx)
    yield


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_roi_coordinates_stay_float32_under_16bit_autocast(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Under autocast res4 is 16-bit; the RoI boxes must not take its dtype: float16 has a 1 px step above 1024 px
    and bfloat16 an 8 px step, so boxes built ``like`` the features move by whole pixels before RoIAlign."""
    seen: list[torch.Tensor] = []
    real_roi_align = detector_mod.roi_align

    def spy(features: torch.Tensor, rois: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(rois.detach().clone())
        return real_roi_align(features, rois, **kw)

    monkeypatch.setattr(detector_mod, "roi_align", spy)
    inp = InputConfig(min_size=750, max_size=1333)
    pipe = Pipeline(tiny_pipeline().model, inp)
    prepared = pipe.prepare(_image(750, 1333))  # already at the test size: no resize, boxes used as given
    assert prepared.resized_hw == (750, 1333)
    boxes = torch.tensor([[1001.3, 700.7, 1303.9, 745.2], [513.25, 10.5, 1100.75, 600.4]])
    with cpu_float16_autocast(monkeypatch):
        opts = RunOptions(dtype=dtype)
        features = pipe.features([prepared], opts)
        # the trunk stays float32 under autocast (modeling.detector.BF16_STAGES, docs/DESIGN.md#trusted-bf16); a 16-bit map
        # (a 16-bit trunk, or a caller's) must still give float32 RoIs
        assert features.dtype == torch.float32
        features = features.to(getattr(torch, dtype))
        emb = pipe.encode(features, [boxes], opts)
    assert emb.shape == (2, TINY_CLIP.embed_dim) and emb.dtype == torch.float32
    rois = torch.cat(seen)
    assert rois.dtype == torch.float32, f"RoIs were built in {rois.dtype} (the 16-bit feature dtype)"
    assert torch.equal(rois[:, 1:], boxes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_detect_with_rpn_and_box_regression_under_16bit_autocast(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """RPN proposals (float32), 16-bit backbone and region head, float32 classifier and box regression: the
    outputs come back float32 with the same shapes as a float32 run."""
    inp = InputConfig(min_size=96, max_size=128)
    torch.manual_seed(0)
    det = build_detector(DetectorConfig(clip=TINY_CLIP, rpn=TINY_RPN, input=inp, box_regression=True)).eval()
    pipe = Pipeline(det, inp)
    vocab = tiny_vocab()
    ref = pipe.detect([_image()], vocab, tiny_options(keep_probs=True, keep_features=True))[0]
    with cpu_float16_autocast(monkeypatch):
        low = pipe.detect([_image()], vocab, tiny_options(dtype=dtype, keep_probs=True, keep_features=True))[0]
    for d in (ref, low):
        assert d.boxes.dtype == d.scores.dtype == torch.float32
        assert d.probs is not None and d.probs.dtype == torch.float32 and d.probs.shape[1] == len(vocab.names) + 1
        assert d.features is not None and d.features.dtype == torch.float32
        assert d.features.shape[1] == TINY_CLIP.embed_dim
    assert len(low.boxes) > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mask_head_runs_under_16bit_dtype(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Fine-tuned LVIS models (mask head): the masks are predicted from the 16-bit res4 map of the same call."""
    inp = InputConfig(min_size=96, max_size=128)
    torch.manual_seed(0)
    det = build_detector(DetectorConfig(clip=TINY_CLIP, input=inp, mask_head=True, box_regression=True)).eval()
    pipe = Pipeline(det, inp)
    with cpu_float16_autocast(monkeypatch):
        d = pipe.detect([_image()], tiny_vocab(), tiny_options(dtype=dtype), boxes=[[[10, 10, 60, 70],
                                                                                     [5, 20, 100, 90]]])[0]
    assert d.masks is not None and d.masks.dtype == torch.bool
    assert d.masks.shape == (len(d.boxes), 100, 120)
