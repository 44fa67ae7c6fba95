"""`evaluate` metric modules shipped with riverone_hf, loaded by local path (offline):
``evaluate.load(metric_path("riverone_perplexity"))``."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """Directory of the shipped metric `name` (``<dir>/<name>.py`` holds its `evaluate.Metric`)."""
    path = os.path.join(HERE, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        shipped = sorted(d for d in os.listdir(HERE) if os.path.isfile(os.path.join(HERE, d, f"{d}.py")))
        raise ValueError(f"no shipped evaluate metric named {name!r}; shipped: {shipped}")
    return path


def metric_info(description: str, inputs_description: str, features: dict):
    """The `evaluate.MetricInfo` of a shipped metric (no citation: riverone's own definitions)."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(module_type="metric", description=description, citation="",
                               inputs_description=inputs_description, features=datasets.Features(features))
