"""Benchmarks (`shadowllm bench`): decode tokens/s and prefill latency per backend and policy, with
the bytes-per-token bound beside each figure (run.py, bound.py), the JSON + markdown report
(report.py) and the GPU decode rows (cuda.py)."""
