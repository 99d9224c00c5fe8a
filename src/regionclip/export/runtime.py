"""Fast runtimes as drop-in :class:`~regionclip.modeling.recognizer.RegionRecognizer` models (docs/EXPORT.md).

:class:`ExportedRegionModel` runs the exported graphs (:mod:`regionclip.export.graphs`) with ONNX Runtime,
OpenVINO or ``torch.export`` for the heavy parts and delegates the cheap float32 parts to the torch detector the
graphs were exported from, so ``Pipeline(ExportedRegionModel(det, dir), input_cfg)`` runs unchanged:

=====================  ===================================================================================
compute_features       torch: normalise + pad (``normalize_and_pad``) -> graph ``trunk``
propose                torch: the RPN's preprocess -> graph ``rpn`` (backbone + head) -> torch: anchors, box
                       decoding, top-k, NMS (exact detectron2 ordering); the torch RPN if none was exported
encode_regions         graph ``region_head`` (RoIAlign -> layer4 -> attnpool), ``chunk_size`` regions per call;
                       ``return_res5=True`` (mask head) runs in torch
classify, predict_boxes, predict_masks: the torch detector (float32)
=====================  ===================================================================================

Everything runs on the CPU (the graphs' outputs come back as CPU tensors); ``RunOptions.dtype`` does not apply
(the precision is fixed at export: float32, or the int8 region head).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..modeling.detector import RegionCLIPDetector, boxes_to_rois, normalize_and_pad
from ..modeling.recognizer import RegionRecognizer
from ..modeling.rpn.model import OfflineRPN
from ..modeling.rpn.rpn_head import RPN
from ..structures import Proposals
from ..utils import require
from .graphs import MANIFEST, MANIFEST_VERSION, state_fingerprint

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "torch-export")
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------- graph runners
class _Runner:
    """Runs one exported graph: named CPU float32 tensors in, output tensors (in manifest order) out."""

    def __call__(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        raise NotImplementedError


class OrtRunner(_Runner):
    """ONNX Runtime session (``providers`` default: CPU; ``threads``: intra-op threads, default torch's)."""

    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> None:
        ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=list(providers or ["CPUExecutionProvider"]))

    def __call__(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]


_OPENVINO_CORE: Any = None
_OPENVINO_CORE_LOCK = threading.Lock()


def openvino_core() -> Any:
    """The process's one ``openvino.Core``, shared by every OpenVINO runner (docs/DEVELOPING.md#known-issues).

    Each ``Core`` loads its own CPU plugin, and each CPU plugin swaps the calling thread's alternate signal stack
    for a fresh mmap on its first compile and, when destroyed, restores the stack it replaced, but only if its
    own is still installed (OpenVINO's ``intel_cpu/src/sigstack_manager.cpp``). Two plugins destroyed in creation
    order therefore leave the main thread's ``sigaltstack`` pointing at the first one's unmapped stack: the next
    signal with a Python handler (all use ``SA_ONSTACK``; torch's DataLoader handles SIGCHLD) is pushed there, a
    SIGSEGV, or a silent write into whatever was mapped there since. One Core means one plugin, created once and
    destroyed at exit. Code of your own that uses OpenVINO in this process should use this Core too.
    """
    global _OPENVINO_CORE
    with _OPENVINO_CORE_LOCK:  # two threads opening runners at once must not make two Cores either
        if _OPENVINO_CORE is None:
            ov = require("openvino", "openvino", "the openvino backend")
            _OPENVINO_CORE = ov.Core()
        return _OPENVINO_CORE


class OpenVinoRunner(_Runner):
    """OpenVINO compiled model on the CPU, float32 inference precision (its default on bf16/AMX CPUs is bf16)."""

    def __init__(self, path: Path, threads: Optional[int] = None) -> None:
        core = openvino_core()  # never a Core per runner: see openvino_core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in inputs.items()}
        res = self.request.infer(feed)
        return [torch.from_numpy(np.array(res[o])) for o in self.compiled.outputs]


class TorchExportRunner(_Runner):
    """A ``torch.export`` program (.pt2) run eagerly (mainly a portability format; no speed-up by itself)."""

    def __init__(self, path: Path, input_names: Sequence[str]) -> None:
        self.module = torch.export.load(str(path)).module()
        self.input_names = list(input_names)

    def __call__(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        with torch.no_grad():
            out = self.module(*[inputs[n].float() for n in self.input_names])
        return list(out) if isinstance(out, (tuple, list)) else [out]


def read_manifest(export_dir: PathLike) -> dict[str, Any]:
    """The manifest of an export folder; a missing one names the command that writes it."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {export_dir}: export the model first "
                                f"(regionclip export --weights W [--rpn-weights R] --format onnx -o {export_dir})")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {manifest.get('manifest_version')}, this regionclip reads "
                         f"version {MANIFEST_VERSION}: export the model again with this version")
    return manifest


def open_graph(export_dir: PathLike, manifest: dict[str, Any], name: str, backend: str, *,
               providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> _Runner:
    """A runner for graph ``name`` of an export folder on ``backend``."""
    graph = manifest["graphs"][name]
    path = Path(export_dir) / graph["file"]
    suffix = path.suffix
    ok = {"onnxruntime": (".onnx",), "openvino": (".onnx", ".xml"), "torch-export": (".pt2",)}[backend]
    if suffix not in ok:
        raise ValueError(f"{path.name} ({manifest['format']} export) cannot run on the {backend} backend: export "
                         f"with --format {'torch-export' if backend == 'torch-export' else 'onnx'}")
    if backend == "onnxruntime":
        return OrtRunner(path, providers, threads)
    if backend == "openvino":
        return OpenVinoRunner(path, threads)
    return TorchExportRunner(path, list(graph["inputs"]))


# ---------------------------------------------------------------------------------------------- the model
class ExportedRegionModel:
    """A :class:`RegionRecognizer` running the exported graphs of ``detector`` (see the module docstring).

    Args:
        detector: the CPU torch detector the graphs were exported from (classifier, box/mask heads, RPN
            selection run here).
        export_dir: folder written by :func:`regionclip.export.graphs.export_model` (``regionclip export``).
        backend: ``onnxruntime`` | ``openvino`` | ``torch-export``.
        int8: use the int8 region head (exported with ``--int8``; onnxruntime/openvino only).
        providers: ONNX Runtime execution providers (default CPU).
        threads: intra-op threads of the runtime (default: torch's ``get_num_threads()``).
        verify: check that ``detector``'s weights are the ones in the manifest (sha256 of the state dict).
        use_rpn_graph: run the RPN backbone + head from its graph when exported (False: the torch RPN).
    """

    def __init__(self, detector: RegionCLIPDetector, export_dir: PathLike, *, backend: str = "onnxruntime",
                 int8: bool = False, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                 verify: bool = True, use_rpn_graph: bool = True) -> None:
        if backend not in BACKENDS or backend == "torch":
            raise ValueError(f"unknown graph backend {backend!r}: choose onnxruntime, openvino or torch-export")
        if not isinstance(detector, RegionCLIPDetector):
            raise TypeError(f"exported graphs exist for the CLIP-ResNet RegionCLIPDetector, got "
                            f"{type(detector).__name__}: run this model with the torch backend")
        if detector.device.type != "cpu":
            raise ValueError("exported graphs run on the CPU: load the model with device='cpu'")
        self.detector = detector
        self.export_dir = Path(export_dir)
        self.backend = backend
        self.manifest = read_manifest(export_dir)
        if verify:
            want, got = self.manifest["fingerprint"]["state_sha256"], state_fingerprint(detector)
            if want != got:
                raise ValueError(f"{self.export_dir} was exported from other weights than this model's (state "
                                 f"sha256 {want[:12]} vs {got[:12]}): export this checkpoint again, or pass "
                                 "the weights it was exported from")
        head = "region_head_int8" if int8 else "region_head"
        if head not in self.manifest["graphs"]:
            raise ValueError(f"{self.export_dir} has no int8 region head: export it with --int8 (onnx format)")
        kw: dict[str, Any] = {"providers": providers, "threads": threads}
        self.trunk = open_graph(export_dir, self.manifest, "trunk", backend, **kw)
        self.region_head = open_graph(export_dir, self.manifest, head, backend, **kw)
        self.rpn_graph = (open_graph(export_dir, self.manifest, "rpn", backend, **kw)
                          if use_rpn_graph and "rpn" in self.manifest["graphs"]
                          and isinstance(detector.rpn, OfflineRPN) else None)
        self.has_background: bool = bool(detector.has_background)
        self.rpn: Optional[nn.Module] = detector.rpn
        self.bbox_pred: Optional[nn.Module] = detector.bbox_pred
        self.mask_head: Optional[nn.Module] = detector.mask_head
        self._warned_dtype = False

    def __repr__(self) -> str:
        return (f"ExportedRegionModel(backend={self.backend!r}, export_dir='{self.export_dir}', "
                f"rpn={'graph' if self.rpn_graph is not None else 'torch' if self.rpn is not None else None})")

    @property
    def embed_dim(self) -> int:
        return int(self.detector.embed_dim)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _note_autocast(self) -> None:
        if not self._warned_dtype and torch.is_autocast_enabled("cpu"):
            self._warned_dtype = True
            logger.warning("the %s backend computes in the precision it was exported with (float32, or the int8 "
                           "region head); --dtype does not apply", self.backend)

    # ------------------------------------------------------------------ heavy parts: graphs
    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images [3, h_i, w_i] -> res4 [B, C4, H/16, W/16] of the padded batch (graph ``trunk``)."""
        self._note_autocast()
        batch = normalize_and_pad(images, self.detector.pixel_mean, self.detector.pixel_std)
        return self.trunk({"images": batch})[0]

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int,
                       return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """[sum R_i, D] raw region embeddings (graph ``region_head``, ``chunk_size`` regions per call), input
        order; ``return_res5`` (the mask head's res5 maps) runs the torch region head instead."""
        if return_res5:
            return self.detector.encode_regions(features, boxes, chunk_size=chunk_size, return_res5=True)
        self._note_autocast()
        features = features.float()
        rois = boxes_to_rois(boxes, features)
        chunk = max(1, int(chunk_size))
        embs = [self.region_head({"res4": features, "rois": rois[s:s + chunk]})[0]
                for s in range(0, rois.shape[0], chunk)]
        return (torch.cat(embs) if embs else features.new_zeros(0, self.embed_dim)), None

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]:
        """Offline-RPN proposals per image, as :meth:`regionclip.modeling.rpn.model.OfflineRPN.forward`: images of
        the same padded size run as one batch; backbone + head in the graph, selection in torch (float32)."""
        if self.rpn_graph is None:
            return self.detector.propose(images)
        rpn = cast(OfflineRPN, self.detector.rpn)
        pg = cast(RPN, rpn.proposal_generator)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(rpn.padded_size(int(img.shape[-2]), int(img.shape[-1])), []).append(i)
        out: list[Optional[Proposals]] = [None] * len(images)
        for idx in groups.values():
            batch, sizes = rpn.preprocess([images[i].float() for i in idx])
            outs = self.rpn_graph({"images": batch})
            levels = len(pg.in_features)
            for i, (boxes, logits) in zip(idx, pg.select_proposals(outs[:levels], outs[levels:], sizes)):
                out[i] = Proposals(boxes=boxes.float(), objectness_logits=logits)
        return [p for p in out if p is not None]

    # ------------------------------------------------------------------ cheap parts: the torch detector
    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor:
        return self.detector.classify(region_emb, class_embeddings)

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor) -> Tensor:
        return self.detector.predict_boxes(region_emb, proposal_boxes)

    def predict_masks(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int) -> list[Tensor]:
        return self.detector.predict_masks(features, boxes, chunk_size=chunk_size)


def make_backend(model: Any, backend: str = "torch", export_dir: Optional[PathLike] = None, *, int8: bool = False,
                 providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                 verify: bool = True) -> RegionRecognizer:
    """The recognizer that runs ``model`` (a :class:`~regionclip.api.RegionCLIP` or a bare detector) on ``backend``:
    ``torch`` -> the detector itself; ``onnxruntime`` / ``openvino`` / ``torch-export`` -> an
    :class:`ExportedRegionModel` over the graphs in ``export_dir``."""
    detector = getattr(model, "detector", model)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if int8:
            raise ValueError("int8 needs an exported int8 region head: use --backend onnxruntime with --int8")
        return detector
    if export_dir is None:
        raise ValueError(f"the {backend} backend runs exported graphs: pass the folder written by "
                         "`regionclip export ... -o DIR` (--export-dir DIR)")
    return ExportedRegionModel(detector, export_dir, backend=backend, int8=int8, providers=providers,
                               threads=threads, verify=verify)
