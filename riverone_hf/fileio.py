"""Output directories that appear whole or not at all.

`atomic_output_dir(OUT)` yields a fresh directory beside OUT, named ``.OUT.partial-<pid>-<random>``. On
success it gets normal permissions (0777 minus the umask), and then:

- OUT absent: it is renamed to OUT;
- OUT present (`overwrite=True`): OUT is renamed aside to ``.OUT.old-<pid>-<random>``, the new directory is
  renamed to OUT, and only then the old one is deleted.

An error or Ctrl-C removes the new directory and puts an old OUT back, so at every moment OUT is either
the old complete directory or the new complete one. A process killed outright (SIGKILL, power loss) leaves
its ``.partial-``/``.old-`` directories behind; the next `atomic_output_dir` for the same OUT removes the
ones whose owning process (the pid in the name) is gone, and, when OUT itself is missing because the kill
fell between the two renames, renames the complete old directory back to OUT.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Raise ValueError now (before long work) if `path` exists and may not be replaced."""
    recover_interrupted(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"output directory {path!r} already exists; pass --overwrite to replace it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output path {path!r} exists and is not a directory")


def _names(path: str) -> tuple[str, str]:
    full = os.path.abspath(path)
    return os.path.dirname(full), os.path.basename(full)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def stale_siblings(path: str) -> dict[str, list[str]]:
    """``{"partial": [...], "old": [...]}``: leftover directories of `path` whose owning process is gone."""
    parent, base = _names(path)
    pattern = re.compile(r"\." + re.escape(base) + r"\.(partial|old)-(\d+)-.+")
    found: dict[str, list[str]] = {"partial": [], "old": []}
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return found
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _pid_alive(int(match.group(2))):
            found[match.group(1)].append(os.path.join(parent, entry))
    return found


def recover_interrupted(path: str) -> None:
    """Clean up after a killed run for `path`: restore an old OUT moved aside, delete stale directories."""
    stale = stale_siblings(path)
    old = sorted(stale["old"], key=os.path.getmtime)
    if old and not os.path.exists(path):
        os.replace(old.pop(), path)  # the kill fell between the two renames: the old OUT is complete
        logger.warning("restored %s from an interrupted --overwrite", path)
    for leftover in stale["partial"] + old:
        logger.info("removing %s, left by a killed run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir beside `path`; on success it replaces `path` (see the module docstring), on any error
    or Ctrl-C it is removed and `path` is left as it was."""
    check_output_dir(path, overwrite)
    parent, base = _names(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-{os.getpid()}-", dir=parent)
            try:
                os.replace(path, old)  # a directory replaces the empty one just made
            except BaseException:
                os.rmdir(old)
                raise
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
