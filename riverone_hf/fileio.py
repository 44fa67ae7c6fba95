"""Output directories that appear whole or not at all (write to a temp dir, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Raise ValueError now (before long work) if `path` exists and may not be replaced."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"output directory {path!r} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir beside `path`; on success it replaces `path`, on any error or Ctrl-C it is removed."""
    check_output_dir(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
