"""shadowllm: a deployment compiler for contextually sparse LLMs.

Stages live in their own folders and import as `shadowllm.<stage>`: models (adapters, loading,
corpora, sparse reference forward), predictor (importance, allocation, masks, accuracy), runtime
(backends, generation). The CLI is `shadowllm` (see `shadowllm --help`).
"""

__version__ = "0.1.0"


def load(folder, sparsity: float = 0.0):
    """Load an export folder (from `shadowllm export`) on ONNX Runtime: `load(DIR).generate("...")`."""
    from .api import load as _load

    return _load(folder, sparsity)
