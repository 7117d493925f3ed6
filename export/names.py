"""The KV-cache names of an export (docs/design.md §4), in the order every backend keeps its caches: layer by
layer, key then value. Kept apart from the exporter so that runtimes name them without importing it."""

from __future__ import annotations


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names): past_key_values.{i}.key/.value, present.{i}.key/.value."""
    kinds = [(i, kv) for i in range(num_layers) for kv in ("key", "value")]
    return [f"past_key_values.{i}.{kv}" for i, kv in kinds], [f"present.{i}.{kv}" for i, kv in kinds]
