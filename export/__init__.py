"""Stage 3: the sparse custom ops (torch.library + ONNX schemas and function bodies); the exporter comes next."""
