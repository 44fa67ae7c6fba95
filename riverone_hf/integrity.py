"""Checkpoint integrity: content hashes of every stored tensor, and the no-plugin load guard.

`save_pretrained` of a riverone model writes, in the safetensors metadata of each weight file,
``riverone.sha256``: a JSON object {file tensor name: sha256 of its raw bytes} covering every tensor of the
checkpoint (all shards), and ``riverone.format``. `verify_checkpoint` (``riverone verify DIR``, and every
`from_pretrained` of a riverone checkpoint unless ``RIVERONE_VERIFY=0``) re-hashes the stored bytes and
raises `IntegrityError` for a changed, missing, unlisted or truncated tensor, and for pickle weight files.
A checkpoint saved before hashes were recorded (no ``riverone.sha256``) has only its structure checked.

The guard (`GUARD_SUFFIX`): the file also stores, under the dense name ``<module>.weight`` of one module the
quantization map rebuilt, a small uint8 tensor whose shape can never be the dense weight's. transformers
without `import riverone_hf` builds the dense model, finds that tensor's size mismatched and raises (instead
of loading random weights); with the plugin, the quantizer gives the rebuilt module a buffer of exactly that
shape, checks its bytes, and removes it after loading. Standard library + torch only.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct

import torch

MANIFEST_KEY = "riverone.sha256"
FORMAT_KEY = "riverone.format"
FORMAT_VERSION = "1"
GUARD_MODULE_KEY = "riverone.guard"
# The guard's bytes: a message, so that even a raw dump of the tensor says what to do.
GUARD_BYTES = b"riverone checkpoint: run `import riverone_hf` before from_pretrained"
GUARD_SUFFIX = "weight"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100_000_000
CHUNK = 16 * 2**20  # safetensors' own limit on the JSON header


class IntegrityError(ValueError):
    """A checkpoint's files do not hold what it recorded (or are not safetensors)."""


def guard_tensor() -> torch.Tensor:
    """The guard stored under `<module>.weight`: 1-D uint8, so no Linear/Conv weight can have its shape."""
    return torch.tensor(list(GUARD_BYTES), dtype=torch.uint8)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (contiguous, little-endian, CPU)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def read_header(path: str) -> tuple[dict, int]:
    """(header, start of the data section) of a safetensors file; IntegrityError if it is malformed or
    truncated (a tensor's bytes reach past the end of the file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise IntegrityError(f"{path}: corrupt or truncated safetensors header (claims {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: corrupt safetensors header (not a JSON object)")
    start = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise IntegrityError(f"{path}: corrupt safetensors header entry for {name!r}")
        if start + offsets[1] > size:
            raise IntegrityError(f"{path}: truncated: tensor {name!r} ends at byte {start + offsets[1]}, "
                                 f"the file has {size}")
    return header, start


def file_metadata(path: str) -> dict[str, str]:
    return read_header(path)[0].get("__metadata__") or {}


def file_digests(path: str) -> dict[str, str]:
    """{tensor name: sha256 of its stored bytes} of one safetensors file (read through mmap)."""
    header, start = read_header(path)
    digests = {}
    with open(path, "rb") as handle:
        if os.path.getsize(path) == 0:
            return {}
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                digest = hashlib.sha256()
                view = memoryview(data)
                for offset in range(start + begin, start + end, CHUNK):  # no copy of the tensor's bytes
                    digest.update(view[offset:min(offset + CHUNK, start + end)])
                view.release()
                digests[name] = digest.hexdigest()
    return digests


def weight_files(directory: str) -> list[str]:
    """The safetensors weight files of a checkpoint directory; IntegrityError for pickle weight files."""
    names = sorted(os.listdir(directory))
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise IntegrityError(
            f"{directory} holds pickle weight file(s) {pickles}; riverone checkpoints are safetensors only and "
            "nothing is ever unpickled. Remove them (or re-save the model with save_pretrained)."
        )
    files = [os.path.join(directory, n) for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise IntegrityError(f"{directory} holds no .safetensors weight file")
    return files


def refuse_pickles(files: list[str]) -> None:
    """IntegrityError naming any checkpoint file that is not safetensors (a riverone load never unpickles)."""
    bad = [f for f in files if not str(f).endswith(WEIGHT_SUFFIXES)]
    if bad:
        raise IntegrityError(
            f"riverone checkpoints are safetensors only; refusing to load {[os.path.basename(b) for b in bad]} "
            "(pickle files can run code when loaded). Convert with a trusted tool, or re-save with save_pretrained."
        )


def verify_files(files: list[str]) -> dict:
    """Check the weight files of one checkpoint against their recorded hashes.

    Returns {"files", "tensors", "bytes", "hashed": bool (False for a checkpoint saved without hashes),
    "keys": set of stored tensor names}. Raises IntegrityError listing every problem found.
    """
    refuse_pickles(files)
    manifest: dict[str, str] | None = None
    stored: dict[str, str] = {}
    problems: list[str] = []
    total = 0
    for path in files:
        metadata = file_metadata(path)
        if MANIFEST_KEY in metadata:
            try:
                this = json.loads(metadata[MANIFEST_KEY])
            except json.JSONDecodeError:
                raise IntegrityError(f"{path}: corrupt `{MANIFEST_KEY}` metadata") from None
            if not isinstance(this, dict):
                raise IntegrityError(f"{path}: corrupt `{MANIFEST_KEY}` metadata")
            if manifest is not None and this != manifest:
                problems.append(f"{os.path.basename(path)} records different hashes than the other weight files")
            manifest = this
        digests = file_digests(path)
        total += os.path.getsize(path)
        for name in set(digests) & set(stored):
            problems.append(f"tensor {name!r} is stored in more than one file")
        stored.update(digests)
    if manifest is not None:
        changed = sorted(n for n in stored if n in manifest and manifest[n] != stored[n])
        unlisted = sorted(set(stored) - set(manifest))
        missing = sorted(set(manifest) - set(stored))
        if changed:
            problems.append(f"{len(changed)} tensor(s) differ from the hashes recorded at save time: {changed[:20]}")
        if missing:
            problems.append(f"{len(missing)} recorded tensor(s) are missing from the files: {missing[:20]}")
        if unlisted:
            problems.append(f"{len(unlisted)} tensor(s) were not recorded at save time: {unlisted[:20]}")
    if problems:
        raise IntegrityError("checkpoint integrity check failed: " + "; ".join(problems))
    return {"files": len(files), "tensors": len(stored), "bytes": total, "hashed": manifest is not None,
            "keys": set(stored)}


def verify_checkpoint(directory: str) -> dict:
    """`verify_files` over the weight files of `directory` (pickle files refused)."""
    return verify_files(weight_files(directory))


def verification_enabled() -> bool:
    """Whether `from_pretrained` re-hashes a riverone checkpoint (set RIVERONE_VERIFY=0 to skip)."""
    return os.environ.get("RIVERONE_VERIFY", "1").strip().lower() not in ("0", "false", "no", "off")
