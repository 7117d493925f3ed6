"""Stage 5: backends behind one interface, the shared generation loop, sampling."""

from .generate import Completion, generate
from .sampling import Sampling
from .torch_backend import TorchBackend

__all__ = ["Completion", "Sampling", "TorchBackend", "generate"]
