"""`tensor_key`: a cheap fingerprint of the data tensors hold now, for caches derived from parameters."""

from __future__ import annotations

import torch


def tensor_key(*tensors: torch.Tensor) -> tuple:
    """Per tensor: (data pointer, version counter, shape, strides, dtype, device).

    It changes with every tracked in-place op (`copy_`, ops under `torch.no_grad()`, optimizer steps,
    `load_state_dict`), with `p.data = t` and with `.to()`, all of which a cache keyed on it must follow.
    It does NOT change with writes through `p.data.<op>_()`: `p.data` is a new tensor with its own version
    counter. Inference tensors have no version counter (-1), so their in-place changes inside
    `torch.inference_mode()` go unseen too.
    """
    return tuple((t.data_ptr(), _version(t), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensor
        return -1
