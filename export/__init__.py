"""Exporters from loaded components to ONNX and TensorRT, with manifests and a content-keyed cache.

Empty for now: the ONNX exporter and the ONNX Runtime backend are issue 4. Exporters know components, not pipelines.
"""
