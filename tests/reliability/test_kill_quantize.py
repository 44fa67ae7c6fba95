"""SIGINT and SIGKILL at seeded random moments of `riverone quantize` on a tiny model: afterwards OUT is
absent, or complete with the reference logits (with --overwrite: the old complete OUT or the new one), and
the next run removes what a killed run left beside OUT."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from riverone_hf.fileio import recover_interrupted
from tests.reliability.conftest import TARGETS
from tests.tiny_models import FAST_AQLM, input_ids

RUN = "import sys; from riverone_hf.cli import main; sys.exit(main(sys.argv[1:]))"
KILLS = [(signal.SIGKILL, False), (signal.SIGINT, False), (signal.SIGKILL, True), (signal.SIGINT, True)]


def _command(src, out, config, overwrite):
    return [sys.executable, "-c", RUN, "quantize", src, out, "--config", config] + (
        ["--overwrite"] if overwrite else [])


def _logits(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(input_ids()).logits


def test_kills_leave_old_or_new_complete(qwen3_dir, tmp_path):
    """A reference run and one victim per (signal, overwrite) case run side by side; each victim gets a
    seeded kill time (a victim that finishes first simply counts as complete)."""
    config = tmp_path / "cfg.yaml"
    targets = ", ".join(f"'{t}'" for t in TARGETS)
    fast = ", ".join(f"{k}: {v}" for k, v in FAST_AQLM.items())
    config.write_text(f"aqlm: {{{fast}, target_modules: [{targets}]}}\n")
    reference = str(tmp_path / "reference" / "out")
    rng = random.Random(14)
    victims = []
    for i, (signum, overwrite) in enumerate(KILLS):
        out = str(tmp_path / f"victim{i}" / "out")
        os.makedirs(os.path.dirname(out))
        if overwrite:
            shutil.copytree(qwen3_dir, out)  # an old, complete directory to replace
            open(os.path.join(out, "OLD"), "w").close()
        victims.append((signum, overwrite, out, rng.uniform(0.5, 12.0)))
    started = time.monotonic()
    ref = subprocess.Popen(_command(qwen3_dir, reference, str(config), False), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen(_command(qwen3_dir, out, str(config), overwrite), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _, overwrite, out, _ in victims]
    pending = set(range(len(victims)))
    while pending:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                pending.discard(i)
            elif time.monotonic() - started >= victims[i][3]:
                procs[i].send_signal(victims[i][0])
                pending.discard(i)
        time.sleep(0.05)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    expected = _logits(reference)
    outcomes = []
    for (signum, overwrite, out, delay), process in zip(victims, procs):
        _, stderr = process.communicate(timeout=300)
        if signum == signal.SIGINT:
            assert process.returncode in (0, 130, -signal.SIGINT), stderr[-2000:]
        recover_interrupted(out)  # what the next run for OUT does first
        leftovers = [n for n in os.listdir(os.path.dirname(out)) if n != "out"]
        assert leftovers == [], leftovers
        if not os.path.exists(out):
            assert not overwrite, "an --overwrite run lost the old OUT"
            outcomes.append((signum.name, round(delay, 1), "absent"))
            continue
        if os.path.exists(os.path.join(out, "OLD")):
            assert os.path.exists(os.path.join(out, "model.safetensors"))  # the old one, complete
            outcomes.append((signum.name, round(delay, 1), "old"))
            continue
        assert torch.equal(_logits(out), expected)
        outcomes.append((signum.name, round(delay, 1), "new"))
    print("kill outcomes:", outcomes)
