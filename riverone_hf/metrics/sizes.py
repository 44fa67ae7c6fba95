"""Honest size accounting of a (compressed) model: bytes as stored, and bits per weight of the
quantized Linears INCLUDING their codebooks and scales."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..modeling.aqlm_linear import AqlmLinear

MIB = 2**20


@dataclass
class SizeReport:
    """Bytes per part of a model; each shared tensor is counted once."""

    parts: dict[str, int] = field(default_factory=dict)
    quantized_weights: int = 0  # number of weights that the AqlmLinear modules stand for

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def quantized_bits_per_weight(self) -> float:
        """(codes + codebooks + scales) bits per quantized weight; NaN when nothing is quantized."""
        stored = sum(self.parts.get(k, 0) for k in ("aqlm codes", "aqlm codebooks", "aqlm scales")) * 8
        return stored / self.quantized_weights if self.quantized_weights else float("nan")

    def lines(self) -> list[str]:
        rows = [f"  {name:<22} {size:>14,d} B  {size / MIB:>10.2f} MiB" for name, size in self.parts.items()]
        rows.append(f"  {'total':<22} {self.total_bytes:>14,d} B  {self.total_bytes / MIB:>10.2f} MiB")
        if self.quantized_weights:
            rows.append(
                f"  quantized Linears: {self.quantized_weights:,d} weights at "
                f"{self.quantized_bits_per_weight():.4f} bits/weight (codes + codebooks + scales)"
            )
        return rows


def size_report(model: nn.Module) -> SizeReport:
    """Bytes of every parameter and buffer of `model`, grouped into AQLM parts, dense Linears and the rest."""
    report = SizeReport()
    owner = {}
    for module_name, module in model.named_modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            owner.setdefault(id(tensor), (module, name, tensor))
    for module, name, tensor in owner.values():
        if isinstance(module, AqlmLinear):
            part = f"aqlm {name}" if name in ("codes", "codebooks", "scales") else "aqlm bias"
        elif isinstance(module, nn.Linear):
            part = "dense Linear"
        elif isinstance(module, nn.Embedding):
            part = "embeddings"
        else:
            part = "other (norms, ...)"
        report.parts[part] = report.parts.get(part, 0) + tensor.numel() * tensor.element_size()
    report.quantized_weights = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, AqlmLinear)
    )
    return report
