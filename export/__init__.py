"""Exporters: a cascade's components to ONNX (onnx.py, checked against PyTorch at export time) and the
content-keyed export cache (cache.py). They read model directories (engine.model_dir), build the torch
components (engine.backends.torch_backend) through the one assembler (engine.assemble) and write the format
of engine/exported/; they never import engine.loading, which imports them.
"""
