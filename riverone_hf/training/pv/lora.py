"""LoRA on `AqlmLinear` through peft's custom-module hook (peft's own AQLM dispatch only knows
`aqlm.QuantizedLinear`).

    from peft import LoraConfig, PeftModel, get_peft_model
    from riverone_hf.training.pv.lora import register_aqlm_lora
    config = register_aqlm_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model, config)           # train with the plain Trainer (peft adapters attached)
    model.save_pretrained(adapter_dir)
    # reload: the mapping is not saved with the adapter, register it again
    model = PeftModel.from_pretrained(base, adapter_dir, config=register_aqlm_lora(LoraConfig.from_pretrained(adapter_dir)))

Merging: an additive-quantized weight cannot absorb a dense low-rank update exactly, so `merge()` refuses;
`merge_to_dense(peft_model)` replaces every adapted AqlmLinear by a dense `nn.Linear` holding
dequantize() + scaling * B A (same outputs, dense size).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ...modeling.aqlm_linear import AqlmLinear


class AqlmLoraLinear(nn.Module, LoraLayer):
    """`AqlmLinear` + sum over active adapters of lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base_layer, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config is not None and getattr(config, "use_dora", False):
            raise ValueError(f"{type(self).__name__} does not support DoRA (use_dora=False)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            out = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (out * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}: an AQLM weight cannot absorb a dense LoRA update exactly; use "
            "riverone_hf.training.pv.lora.merge_to_dense(model) for a dense merged Linear"
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_aqlm_lora(config):
    """Route LoRA on `AqlmLinear` to `AqlmLoraLinear` (peft `LoraConfig._register_custom_module`); returns config."""
    config._register_custom_module({AqlmLinear: AqlmLoraLinear})
    return config


@torch.no_grad()
def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replace every `AqlmLoraLinear` in `model` by a dense `nn.Linear` with dequantize() + the active adapters'
    deltas (in place; returns `model`)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, AqlmLoraLinear):
            continue
        base = module.get_base_layer()
        weight = base.dequantize().detach().float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        dense.weight.copy_(weight)
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model
