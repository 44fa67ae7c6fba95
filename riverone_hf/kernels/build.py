"""Building and loading the AQLM CPU kernels (`aqlm_cpu.cpp`, next to this file).

The C++ is compiled once per machine with `torch.utils.cpp_extension.load` (flags for the vector ISA
this CPU has), cached under `$RIVERONE_HF_KERNEL_DIR` or `$XDG_CACHE_HOME/riverone_hf/cpu_kernels`
(default `~/.cache/...`) in a directory named by a hash of the source, the flags, the torch version and
the machine, and called through ctypes (a plain shared library with a C ABI, no Python module). If the
build fails (no compiler, no torch headers), the first use warns loudly once and the kernels report
unavailable, so callers use their dequantize + matmul path. `RIVERONE_HF_DISABLE_CPU_KERNELS=1` turns
the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_DISABLE", "ENV_KERNEL_DIR", "SOURCE", "cpu_kernels_available", "cpu_kernels_build_error", "library"]

logger = logging.getLogger(__name__)

ENV_DISABLE = "RIVERONE_HF_DISABLE_CPU_KERNELS"
ENV_KERNEL_DIR = "RIVERONE_HF_KERNEL_DIR"
SOURCE = Path(__file__).with_name("aqlm_cpu.cpp")

_ABI_VERSION = 1  # what `rv_abi_version()` in the C++ returns; bump both together when a signature changes

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_cflags() -> list[str]:
    """Compiler flags for the vector ISA this CPU has (the build is cached per flag set)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = _cpu_flags()
    out: list[str] = []
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        out += ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return out


def _kernel_dir() -> str:
    base = os.environ.get(ENV_KERNEL_DIR)
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "riverone_hf", "cpu_kernels")
    return base


def _bind(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "rv_abi_version": [],
        "rv_lut": [P, I, I, I, P, I, I, I, P, P, P, P, I],
        "rv_gemm": [P, I, P, I, I, I, I, I, I, I, P, P, P, P],
        "rv_dequant": [P, I, I, I, I, I, I, I, P, P, P],
        "rv_dd": [P, I, P, I, I, I, I, I, P, I, P, P, P],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = I


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then loaded from the cache dir), or None if unavailable."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        cflags = ["-O3", "-fopenmp", *_isa_cflags()]
        build_dir = _kernel_dir()
        try:
            from torch.utils.cpp_extension import load

            source = SOURCE.read_text()
            digest = hashlib.sha256(
                "\n".join([source, " ".join(cflags), torch.__version__, platform.machine()]).encode()
            ).hexdigest()[:16]
            name = f"riverone_aqlm_cpu_{digest}"
            build_dir = os.path.join(build_dir, name)
            os.makedirs(build_dir, exist_ok=True)
            path = load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=build_dir,
                is_python_module=False,
                verbose=False,
            )
            lib = ctypes.CDLL(path)
            _bind(lib)
            if lib.rv_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"kernel library {path} has ABI {lib.rv_abi_version()}, expected {_ABI_VERSION}")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any build/load failure means: no kernels, say so loudly
            _lib_error = f"{type(exc).__name__}: {exc}"
            message = (
                "riverone_hf: could not build/load the AQLM CPU kernels (needs a C++ compiler and the torch "
                f"headers; source {SOURCE}, build dir {build_dir}). Falling back to dequantize + matmul, which is "
                f"several times slower and allocates the full fp32 weight on every call. Cause: {_lib_error}"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
    return _lib


def cpu_kernels_available() -> bool:
    """Whether the compiled kernels can be used (builds them on first call; False if disabled by env)."""
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return False
    return library() is not None


def cpu_kernels_build_error() -> str | None:
    """Why the kernels could not be built/loaded, or None."""
    return _lib_error
