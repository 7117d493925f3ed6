"""Stage 4: ONNX passes and build targets (`shadowllm build`)."""
