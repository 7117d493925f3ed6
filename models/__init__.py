"""Stage 1: architecture adapters, model loading, corpora and the sparse PyTorch reference forward."""

from .adapters import Arch, adapter_for
from .corpus import Corpus, corpus
from .errors import ShadowError
from .loading import DEFAULT_MODEL, fingerprint, load
from .reference import sparse_forward

__all__ = ["Arch", "Corpus", "DEFAULT_MODEL", "ShadowError", "adapter_for", "corpus", "fingerprint", "load",
           "sparse_forward"]
