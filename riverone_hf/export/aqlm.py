"""Convert between riverone AQLM checkpoints and stock transformers' AQLM format (`AqlmConfig` + the `aqlm` package).

The tensors already use the aqlm layout and names. Export copies the checkpoint files and rewrites
`quantization_config` as an `AqlmConfig` (dropping riverone's guard tensor and hashes) whose
`linear_weights_not_to_quantize` lists every Linear that riverone left dense (module names AND `<name>.weight`,
which transformers 5.x and the aqlm converter each expect). Stock AQLM has one global scheme, so mixed schemes
and non-AQLM stages are refused.

Import (`import_aqlm`) is the reverse, for checkpoints as the AQLM authors publish them: the Linears whose
`<name>.codes` are stored become riverone AqlmLinear entries of the one scheme (checked against the config's
skip list), the model is loaded through riverone and saved with riverone's hashes and guard, so it can be
PV-tuned and run with riverone's CPU kernels; the logits are those of the same tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn
from transformers import AqlmConfig, AutoConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from .. import integrity
from ..aq.settings import SCHEME_FIELDS
from ..config import RiverOneConfig
from ..fileio import atomic_output_dir, check_output_dir


def _model_class(config):
    """The transformers class that config.json's `architectures` names."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"config.json names no transformers architecture class (architectures={architectures})")
    return getattr(transformers, architectures[0])


def _read_config(src: str):
    """The transformers config of checkpoint folder `src`; ValueError (before any work) when it has none."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ValueError(f"{src!r} is not a checkpoint folder: no config.json")
    return AutoConfig.from_pretrained(src)


def _linear_names(config) -> list[str]:
    """Full names of every nn.Linear of the model that `config` describes (built on the meta device)."""
    with torch.device("meta"):
        skeleton = _model_class(config)(config)
    return [name for name, module in skeleton.named_modules() if isinstance(module, nn.Linear)]


def stock_aqlm_config(src: str) -> AqlmConfig:
    """The `AqlmConfig` under which stock transformers loads the riverone checkpoint in `src`."""
    config = _read_config(src)
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
            if name.endswith(integrity.PICKLE_SUFFIXES):
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


def _stored_tensor_names(src: str) -> set[str]:
    """Names of every tensor in the safetensors files of checkpoint folder `src` (headers only)."""
    from safetensors import safe_open

    files = [name for name in os.listdir(src) if name.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{src}: no .safetensors weight files (only safetensors checkpoints are imported)")
    names: set[str] = set()
    for name in files:
        with safe_open(os.path.join(src, name), framework="pt") as handle:
            names.update(handle.keys())
    return names


def riverone_config_for_stock_aqlm(src: str, config=None) -> RiverOneConfig:
    """The riverone config (one AQLM map entry per quantized Linear) of the stock AQLM checkpoint in `src`
    (`config`: its transformers config, when already read)."""
    config = _read_config(src) if config is None else config
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") != "aqlm":
        raise ValueError(f"{src}: quantization_config.quant_method is {quant.get('quant_method')!r}; --format aqlm "
                         "imports checkpoints of transformers' AQLM integration (quant_method 'aqlm')")
    scheme = {field: int(quant[field]) for field in SCHEME_FIELDS}
    stored = _stored_tensor_names(src)
    skip = list(quant.get("linear_weights_not_to_quantize") or [])
    quantized = []
    for name in _linear_names(config):
        has_codes, listed_dense = f"{name}.codes" in stored, name in skip or f"{name}.weight" in skip
        if has_codes and listed_dense:
            raise ValueError(f"{src}: `{name}` has stored codes but linear_weights_not_to_quantize lists it as dense")
        if not has_codes and f"{name}.weight" not in stored and not listed_dense:
            raise ValueError(f"{src}: the Linear `{name}` has neither `{name}.codes` nor `{name}.weight` stored")
        if has_codes:
            quantized.append(name)
    if not quantized:
        raise ValueError(f"{src}: no Linear has stored codes (`<name>.codes`): not an AQLM checkpoint")
    return RiverOneConfig(quantization_map={name: {"stage": "aqlm", **scheme} for name in quantized})


def import_aqlm(src: str, out: str, overwrite: bool = False) -> RiverOneConfig:
    """Write to `out` a riverone checkpoint (hashes, guard) of the stock AQLM checkpoint `src`, same tensors."""
    check_output_dir(out, overwrite)
    config = _read_config(src)
    riverone = riverone_config_for_stock_aqlm(src, config)
    model_cls = _model_class(config)
    with tempfile.TemporaryDirectory(prefix="riverone-import-") as staging:
        for name in os.listdir(src):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(integrity.PICKLE_SUFFIXES):
                os.symlink(os.path.abspath(path), os.path.join(staging, name))
        config_path = os.path.join(staging, "config.json")
        with open(config_path, encoding="utf-8") as handle:
            stored = json.load(handle)
        stored["quantization_config"] = riverone.to_dict()
        os.unlink(config_path)  # a link to src's file: replace it, never write through it
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(stored, handle, indent=2, sort_keys=True)
        model = model_cls.from_pretrained(staging)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            for name in os.listdir(src):
                path = os.path.join(src, name)
                weights = name.endswith((".safetensors", ".safetensors.index.json", *integrity.PICKLE_SUFFIXES))
                if os.path.isfile(path) and not weights and not os.path.exists(os.path.join(tmp, name)):
                    shutil.copy2(path, os.path.join(tmp, name))
    return riverone
