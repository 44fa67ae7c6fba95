"""Shared fixtures and marker handling for the whole suite.

Markers (declared in pyproject.toml, `--strict-markers`):
    gpu: needs CUDA; skipped when `torch.cuda.is_available()` is False.
    aqlm: needs the `aqlm` package importable; skipped otherwise.
    slow: long-running; deselect with `-m 'not slow'`.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.tiny_models import save_dense, tiny_qwen3, tiny_vit


def _aqlm_import_error() -> str | None:
    """Why `import aqlm` fails here, or None when it works."""
    try:
        importlib.import_module("aqlm")
    except Exception as error:  # noqa: BLE001  (a broken install counts as missing, whatever it raises)
        return f"{type(error).__name__}: {error}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (marked gpu): torch.cuda.is_available() is False")
        for item in gpu:
            item.add_marker(skip)
    needs_aqlm = [item for item in items if item.get_closest_marker("aqlm")]
    if needs_aqlm:  # import aqlm (and numba) only when some collected test asks for it
        error = _aqlm_import_error()
        if error is not None:
            skip = pytest.mark.skip(reason=f"needs the aqlm package (marked aqlm): `import aqlm` failed ({error})")
            for item in needs_aqlm:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Every test module runs on one torch thread: with 2 OpenMP threads on a shared, loaded 2-core machine
    each small matmul waits at a barrier (measured: 25 ms instead of 0.015 ms). A test that needs more
    threads sets them itself (and restores them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    """A saved dense `tiny_qwen3()` checkpoint with the char tokenizer beside it. Shared by the session
    (one per xdist worker): read it, never write into it."""
    return save_dense(tiny_qwen3(), tmp_path_factory.mktemp("qwen3") / "dense")


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory) -> str:
    """A saved dense `tiny_vit()` checkpoint with the char tokenizer beside it. Read-only, like `qwen3_dir`."""
    return save_dense(tiny_vit(), tmp_path_factory.mktemp("vit") / "dense")
