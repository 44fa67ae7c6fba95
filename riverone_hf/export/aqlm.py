"""Export a riverone AQLM checkpoint for stock transformers (`AqlmConfig`) + the `aqlm` package.

The tensors already use the aqlm layout and names, so export copies the checkpoint files and rewrites
`quantization_config` as an `AqlmConfig` (dropping riverone's guard tensor and hashes) whose `linear_weights_not_to_quantize` lists every Linear that
riverone left dense (module names AND `<name>.weight`, which transformers 5.x and the aqlm converter
each expect). Stock AQLM has one global scheme, so mixed schemes and non-AQLM stages are refused.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn
from transformers import AqlmConfig, AutoConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from .. import integrity
from ..aq.settings import SCHEME_FIELDS
from ..config import RiverOneConfig
from ..fileio import atomic_output_dir


def _linear_names(config) -> list[str]:
    """Full names of every nn.Linear of the model that `config` describes (built on the meta device)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"config.json names no transformers architecture class (architectures={architectures})")
    model_cls = getattr(transformers, architectures[0])
    with torch.device("meta"):
        skeleton = model_cls(config)
    return [name for name, module in skeleton.named_modules() if isinstance(module, nn.Linear)]


def stock_aqlm_config(src: str) -> AqlmConfig:
    """The `AqlmConfig` under which stock transformers loads the riverone checkpoint in `src`."""
    config = AutoConfig.from_pretrained(src)
    quant = config.quantization_config
    riverone = quant if isinstance(quant, RiverOneConfig) else RiverOneConfig.from_dict(quant)
    stages = {entry.get("stage") for entry in riverone.quantization_map.values()}
    if stages != {"aqlm"}:
        raise ValueError(f"--format aqlm can only export AQLM-only checkpoints; this one has stages {sorted(stages)}")
    schemes = {tuple(entry[k] for k in SCHEME_FIELDS) for entry in riverone.quantization_map.values()}
    if len(schemes) != 1:
        raise ValueError(
            f"stock AQLM supports one scheme per model; this checkpoint mixes {sorted(schemes)} "
            f"(as {list(SCHEME_FIELDS)})"
        )
    dense = [name for name in _linear_names(config) if name not in riverone.quantization_map]
    not_to_quantize = sorted(dense + [f"{name}.weight" for name in dense])
    for name in riverone.quantization_map:
        if not should_convert_module(name, not_to_quantize):
            raise ValueError(f"the skip list for stock AQLM would also skip the quantized module `{name}`")
    return AqlmConfig(**dict(zip(SCHEME_FIELDS, schemes.pop())), linear_weights_not_to_quantize=not_to_quantize)


def _write_without_riverone_parts(src: str, dst: str) -> None:
    """Copy a weight file without what only riverone reads: the no-plugin guard tensor (stock transformers
    would report it as an unexpected key) and the `riverone.*` metadata (hashes of a file that changed)."""
    from safetensors.torch import load_file, save_file

    metadata = integrity.file_metadata(src)
    guard = metadata.get(integrity.GUARD_MODULE_KEY)
    tensors = load_file(src)
    if guard is not None:
        tensors.pop(f"{guard}.{integrity.GUARD_SUFFIX}", None)
    save_file(tensors, dst, metadata={k: v for k, v in metadata.items() if not k.startswith("riverone.")})


def export_aqlm(src: str, out: str, overwrite: bool = False) -> AqlmConfig:
    """Write to `out` a copy of the riverone checkpoint `src` that stock transformers + aqlm load."""
    aqlm_config = stock_aqlm_config(src)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for name in os.listdir(src):
            path = os.path.join(src, name)
            if name.endswith((".bin", ".pt", ".pth", ".pkl")):
                raise ValueError(f"{path}: only safetensors checkpoints are exported (nothing is unpickled)")
            if name.endswith(".safetensors"):
                _write_without_riverone_parts(path, os.path.join(tmp, name))
            elif os.path.isfile(path):
                shutil.copy2(path, os.path.join(tmp, name))
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["quantization_config"] = aqlm_config.to_dict()
        config["quantization_config"]["quant_method"] = "aqlm"
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
    return aqlm_config
