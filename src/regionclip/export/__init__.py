"""Export the CLIP-ResNet detector's heavy parts (ONNX / OpenVINO IR / torch.export) and run them as a drop-in
:class:`~regionclip.modeling.recognizer.RegionRecognizer` (docs/EXPORT.md).

>>> from regionclip.export import export_model, make_backend
>>> export_model(model.detector, "export/rn50", fmt="onnx", int8=True)
>>> fast = Pipeline(make_backend(model, "onnxruntime", "export/rn50"), model.pipeline.input_cfg)

The optional runtimes are imported when used: ``pip install 'regionclip[onnx]'`` (onnx, onnxruntime) or
``'regionclip[openvino]'``.
"""
from .graphs import FORMATS, MANIFEST, ONNX_OPSET, export_model, state_fingerprint
from .quantize import calibration_pairs, quantize_region_head
from .runtime import BACKENDS, ExportedRegionModel, make_backend, openvino_core, read_manifest

OnnxRegionModel = ExportedRegionModel  # the name used in issue 17; the class runs every graph backend

__all__ = ["FORMATS", "MANIFEST", "ONNX_OPSET", "BACKENDS", "export_model", "state_fingerprint", "calibration_pairs",
           "quantize_region_head", "ExportedRegionModel", "OnnxRegionModel", "make_backend", "openvino_core",
           "read_manifest"]
