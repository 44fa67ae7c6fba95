"""`atomic_output_dir`: an interrupt at any step leaves OUT old-and-complete or new-and-complete; stale
directories of killed runs are removed by the next run; the result has normal permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from riverone_hf import fileio
from riverone_hf.fileio import atomic_output_dir, recover_interrupted


def _write(path, text):
    with open(os.path.join(path, "payload.txt"), "w") as handle:
        handle.write(text)


def _read(path):
    with open(os.path.join(path, "payload.txt")) as handle:
        return handle.read()


def _siblings(out):
    return sorted(n for n in os.listdir(os.path.dirname(out)) if n != os.path.basename(out))


def test_new_output_has_normal_permissions(tmp_path):
    out = str(tmp_path / "out")
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(out) as tmp:
            _write(tmp, "new")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert _read(out) == "new" and _siblings(out) == []


@pytest.mark.parametrize("fail_at", [1, 2])
def test_overwrite_interrupted_at_each_rename_keeps_the_old_output(tmp_path, monkeypatch, fail_at):
    out = str(tmp_path / "out")
    os.makedirs(out)
    _write(out, "old")
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at:  # 1: moving OUT aside, 2: moving the new one in (OUT is aside then)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            _write(tmp, "new")
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert _read(out) == "old"
    assert _siblings(out) == []


def test_interrupt_while_writing_keeps_the_old_output(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    _write(out, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            _write(tmp, "half")
            raise KeyboardInterrupt
    assert _read(out) == "old" and _siblings(out) == []


def test_overwrite_replaces_and_leaves_nothing_beside(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    _write(out, "old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        _write(tmp, "new")
    assert _read(out) == "new" and _siblings(out) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_directories_of_dead_processes_are_cleaned(tmp_path):
    out = str(tmp_path / "out")
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-abc"
    alive = tmp_path / f".out.partial-{os.getppid()}-abc"  # a live process (our parent): left alone
    other = tmp_path / f".other.partial-{dead}-abc"  # another OUT's: left alone
    for path in (stale, alive, other):
        path.mkdir()
    with atomic_output_dir(out) as tmp:
        _write(tmp, "new")
    assert not stale.exists() and alive.exists() and other.exists()


def test_kill_between_the_renames_is_recovered(tmp_path):
    """SIGKILL after OUT moved aside, before the new one moved in: the next run restores the old OUT."""
    out = str(tmp_path / "out")
    dead = _dead_pid()
    old = tmp_path / f".out.old-{dead}-abc"
    old.mkdir()
    _write(str(old), "old")
    (tmp_path / f".out.partial-{dead}-def").mkdir()
    recover_interrupted(out)
    assert _read(out) == "old" and _siblings(out) == []
