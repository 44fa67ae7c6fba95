"""What machine a benchmark ran on, for the tables it prints."""

import os
import platform

import torch


def machine() -> dict:
    """CPU model, cores this process may use, architecture, torch and python versions."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": model, "cores": cores, "arch": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version()}
