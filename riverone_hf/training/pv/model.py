"""`get_pv_model`: prepare a riverone (AqlmLinear) model for PV-Tuning, in place."""

from __future__ import annotations

import types

from torch import nn

from ...modeling.aqlm_linear import AqlmLinear
from ...stages.targeting import modules_matching
from .config import PVTuningConfig
from .vstep import PVState


def _embedding_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            names |= {id(p) for p in module.parameters()}
    return names


def get_pv_model(model: nn.Module, config: PVTuningConfig | None = None) -> nn.Module:
    """Mark what the P-step trains, attach the V-step state (`model.pv_state`) and return the same model.

    Trainable (P-step): the codebooks and scales of every AqlmLinear (and their biases), every other 1-D parameter
    (norm weights, biases) unless `train_norms_and_biases=False`, the embeddings and lm_head only with
    `train_embeddings=True`, and every floating parameter of the modules `modules_to_train` names (e.g. a VLM's
    projector). Everything else is frozen. Codes are integers: the V-step changes them.
    The model gains `print_trainable_parameters()`.
    """
    config = config or PVTuningConfig()
    if not isinstance(config, PVTuningConfig):
        raise ValueError(f"`config` must be a PVTuningConfig, got {type(config).__name__}")
    quantized = [m for m in model.modules() if isinstance(m, AqlmLinear)]
    if not quantized:
        raise ValueError("`model` has no AqlmLinear module: load a riverone AQLM checkpoint (import riverone_hf first)")
    if getattr(model, "pv_state", None) is not None:
        model.pv_state.remove()
    embedding_ids = _embedding_parameter_names(model)
    quantized_ids = {}
    for module in quantized:
        quantized_ids[id(module.codebooks)] = config.train_codebooks
        quantized_ids[id(module.scales)] = config.train_scales
        if module.bias is not None:
            quantized_ids[id(module.bias)] = config.train_norms_and_biases
        module.codes.requires_grad_(False)
    for param in model.parameters():
        if id(param) in quantized_ids:
            trainable = quantized_ids[id(param)]
        elif not param.is_floating_point():
            trainable = False
        elif id(param) in embedding_ids:
            trainable = config.train_embeddings
        else:
            trainable = config.train_norms_and_biases and param.ndim == 1
        param.requires_grad_(trainable)
    if config.modules_to_train is not None:
        chosen = modules_matching(dict(model.named_modules()), config.modules_to_train, "modules_to_train", "module")
        for name in chosen:
            for param in model.get_submodule(name).parameters():
                if param.is_floating_point():
                    param.requires_grad_(True)
    model.pv_state = PVState(model, config)
    model.print_trainable_parameters = types.MethodType(print_trainable_parameters, model)
    return model


def trainable_parameter_summary(model: nn.Module) -> dict[str, int]:
    """Counts (elements) and bytes (as stored) of: trainable continuous parameters, frozen continuous parameters,
    and codes (integer entries, changed by the V-step, never by the optimizer)."""
    summary = dict.fromkeys(["trainable", "trainable_bytes", "frozen", "frozen_bytes", "codes", "codes_bytes"], 0)
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        kind = "codes" if not param.is_floating_point() else ("trainable" if param.requires_grad else "frozen")
        summary[kind] += param.numel()
        summary[f"{kind}_bytes"] += param.numel() * param.element_size()
    return summary


def print_trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Print (and return) `trainable_parameter_summary`: counts and bytes, codes counted apart."""
    s = trainable_parameter_summary(model)
    mib = 2**20
    print(
        f"trainable params (P-step): {s['trainable']:,} ({s['trainable_bytes'] / mib:.3f} MiB) || "
        f"frozen params: {s['frozen']:,} ({s['frozen_bytes'] / mib:.3f} MiB) || "
        f"codes (V-step, integer entries): {s['codes']:,} ({s['codes_bytes'] / mib:.3f} MiB)"
    )
    return s
