"""faceset engines: run exported face models fast (ONNX Runtime, TensorRT, torch)."""
