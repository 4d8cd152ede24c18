"""Converters: third-party weights -> ONNX files with a model card that `engines/` loads.

Each converter rebuilds the network in torch, loads the published weights, exports ONNX
atomically and checks torch against ONNX Runtime before anything replaces a shipped file.
"""
