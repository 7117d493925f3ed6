"""Serving: the generation service behind Triton's Python backend (service.py, triton_model.py) and
the bundled Triton server with its loopback client (server.py, client.py). The model repository
itself is a build target (compiler/triton.py)."""
