"""shadowllm: a deployment compiler for contextually sparse LLMs.

Stages live in their own folders and import as `shadowllm.<stage>`, each importing only the ones
before it: models <- predictor <- export <- compiler <- runtime <- (parity, bench, serving) <- this
front door (CLI, `load`). The CLI is `shadowllm` (see `shadowllm --help`); docs/design.md is the map.
"""

__version__ = "0.1.0"


def load(path_or_model_name=None, backend: str = "ort", sparsity: float = 0.0, threads: int | None = None,
         dtype: str = "bf16"):
    """An export folder on backend ort | torch | cuda | tensorrt, or a model (name or local HF folder)
    run dense on torch or cuda: `shadowllm.load(DIR).generate("...", max_new_tokens=8).text`.
    See shadowllm/api.py."""
    from .api import load as _load

    return _load(path_or_model_name, backend, sparsity, threads, dtype)
