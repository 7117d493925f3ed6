"""Parity: the deployed model against an independent reference, op by op and token by token
(`shadowllm parity`): onnxruntime vs the PyTorch reference (check.py), TensorRT vs onnxruntime
through Polygraphy (check.py), the CUDA backend vs the PyTorch reference (cuda.py)."""
