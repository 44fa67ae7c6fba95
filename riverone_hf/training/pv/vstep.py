"""The V-step: fp32 straight-through proxies of the quantized weights, an Adam-like step on them, and the
re-encoding of the code groups whose proxy moved furthest, by the engine's beam search.

Gradient of the loss with respect to a dequantized weight W = s ⊙ A(C): every AqlmLinear gets a forward hook
that, when its output needs a gradient, registers a tensor hook adding grad_outᵀ · x (fp32) into the module's
accumulator — the gradient `F.linear` would give its weight. Accumulators sum over micro-batches (gradient
accumulation, and over the optimizer steps between two V-steps with `v_step_every` > 1), are averaged across
processes (all-reduce) at the V-step, and are cleared after it.

`PVOptimizer` wraps the P-step optimizer (AdamW by default): `step()` = P-step on the continuous parameters,
then V-step on the codes. It shares the inner optimizer's `param_groups` (so LR schedulers drive the P-step; the
V-step's `code_lr` follows the same schedule), and its `state_dict` holds both the P-step state and, per quantized
weight, the proxy and its moments (fp32), so a checkpoint resumes with the same proxies and optimizer states.

FSDP2 (`fully_shard`: per-parameter DTensors, so the int8/int16 codes keep their dtype and are never flattened
into a float buffer; they never require grad): the V-step all-gathers each weight's codes, codebooks and scales,
computes on the whole weight exactly as one process would (the proxy and its moments are whole on every rank:
12 bytes per quantized weight, not sharded), and each rank writes back only its own shard of the new codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ...aq.beam_search import beam_search_codes
from ...aq.layout import dequantize, pack_codes, unpack_codes
from ...modeling.aqlm_linear import AqlmLinear
from .config import PVTuningConfig


class PVState:
    """What `get_pv_model` attaches to a model: its config, the quantized modules by name, gradient hooks."""

    def __init__(self, model: nn.Module, config: PVTuningConfig):
        self.config = config
        self.modules: dict[str, AqlmLinear] = {n: m for n, m in model.named_modules() if isinstance(m, AqlmLinear)}
        self.grads: dict[str, torch.Tensor | None] = dict.fromkeys(self.modules)
        self.handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if not (self.config.v_step and torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()

            def accumulate(grad_out):
                g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                held = self.grads[name]
                self.grads[name] = g if held is None else held.add_(g)

            output.register_hook(accumulate)

        return hook

    def clear_grads(self) -> None:
        self.grads = dict.fromkeys(self.modules)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2-sharded parameter (DTensor) is all-gathered, anything else returned as is."""
    tensor = tensor.detach()
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def _write_codes(module: AqlmLinear, codes: torch.Tensor) -> None:
    """Store the whole new `codes` in `module.codes`: in place, or, when FSDP2 shards it, this rank's shard only
    (sliced locally the way the DTensor's placements cut it, no communication)."""
    if _is_sharded(module.codes):
        shard = distribute_tensor(codes, module.codes.device_mesh, module.codes.placements, src_data_rank=None)
        module.codes.to_local().copy_(shard.to_local())
    else:
        module.codes.copy_(codes)


def whole_dequantized(module: AqlmLinear) -> torch.Tensor:
    """The module's whole dequantized weight [out, in] in fp32, also when FSDP2 shards its parameters."""
    return dequantize(whole_tensor(module.codes), whole_tensor(module.codebooks), whole_tensor(module.scales)).float()


def group_distances(delta: torch.Tensor, module: AqlmLinear) -> torch.Tensor:
    """[out, in] difference -> [O*I] squared norm per code group (one group = out_group x in_group weights)."""
    num_out_groups, num_in_groups, _ = module.codes.shape
    view = delta.view(num_out_groups, module.out_group_size, num_in_groups, module.in_group_size)
    return view.square().sum((1, 3)).reshape(-1)


@torch.no_grad()
def reencode_groups(
    module: AqlmLinear,
    target: torch.Tensor,
    groups: torch.Tensor,
    *,
    beam_size: int,
    generator: torch.Generator,
    max_chunk_bytes: int,
) -> int:
    """Re-encode the code groups `groups` (flat indices into O*I) of `module` against `target` [out, in] by beam
    search (data-free objective: each group on its own); writes the codes back in the aqlm layout (signed
    int8/int16 via `pack_codes`) and returns how many groups changed."""
    if groups.numel() == 0:
        return 0
    num_out_groups, num_in_groups, num_codebooks = module.codes.shape
    go, gi, nbits = module.out_group_size, module.in_group_size, module.nbits_per_codebook
    k = groups.numel()
    codes = unpack_codes(whole_tensor(module.codes), nbits).reshape(num_out_groups * num_in_groups, num_codebooks)
    target_groups = (
        target.float().view(num_out_groups, go, num_in_groups, gi).permute(0, 2, 1, 3)
        .reshape(num_out_groups * num_in_groups, go, gi)
    )
    # the selected groups as k output groups with one input group each: [k*go, gi]
    weight = target_groups.index_select(0, groups).reshape(k * go, gi)
    start = codes.index_select(0, groups).view(k, 1, num_codebooks)
    scales = whole_tensor(module.scales).float().reshape(-1).repeat_interleave(num_in_groups).index_select(0, groups)
    new = beam_search_codes(
        weight, start, whole_tensor(module.codebooks).float(), scales.view(k, 1, 1, 1), None,
        beam_size=beam_size, generator=generator, max_chunk_bytes=max_chunk_bytes,
    ).view(k, num_codebooks)
    changed = int((new != start.view(k, num_codebooks)).any(-1).sum())
    codes = codes.index_copy(0, groups, new)
    _write_codes(module, pack_codes(codes.view(num_out_groups, num_in_groups, num_codebooks), nbits))
    return changed


class PVOptimizer(torch.optim.Optimizer):
    """P-step (the wrapped optimizer) then V-step (proxies + beam-search re-encoding) in one `step()`."""

    def __init__(self, p_optimizer: torch.optim.Optimizer, pv_state: PVState):
        self.p_optimizer = p_optimizer
        self.pv_state = pv_state
        self.config = pv_state.config
        super().__init__([{"params": []}], dict(p_optimizer.defaults))
        self.param_groups = p_optimizer.param_groups
        self.state = p_optimizer.state
        self.defaults = p_optimizer.defaults
        self.v_step_count = 0
        self.proxies: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for name, module in pv_state.modules.items():
                proxy = whole_dequantized(module).clone()
                self.proxies[name] = {
                    "proxy": proxy, "exp_avg": torch.zeros_like(proxy), "exp_avg_sq": torch.zeros_like(proxy)
                }
        self.monitor: Callable[[str], None] | None = None  # called with "before", "after_p", "after_v"
        self.last_changed: dict[str, int] = {}
        self.optimizer_steps = 0
        # codebooks and scales as of the last V-step (`proxy_follows_p_step`), taken before the next P-step
        self._since_v_step: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def v_step_due(self, optimizer_step: int) -> bool:
        """Whether optimizer step `optimizer_step` (counted from 1) runs a V-step."""
        return self.config.v_step and optimizer_step % self.config.v_step_every == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.p_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.monitor is not None:
            self.monitor("before")
        if self.config.v_step and self.config.proxy_follows_p_step and self._since_v_step is None:
            self._since_v_step = self._continuous_snapshot()
        self.p_optimizer.step()
        self.optimizer_steps += 1
        if self.monitor is not None:
            self.monitor("after_p")
        if self.v_step_due(self.optimizer_steps):
            self.v_step(self._since_v_step, accumulated_steps=self.config.v_step_every)
            self._since_v_step = None
        if self.monitor is not None:
            self.monitor("after_v")
        return loss

    def lr_schedule_factor(self) -> float:
        """The P-step's current lr over its initial lr (1 without a scheduler): the V-step's `code_lr` follows the
        same schedule (warm-up, decay) as the P-step's lr."""
        group = self.param_groups[0]
        initial = group.get("initial_lr", group["lr"])
        return float(group["lr"] / initial) if initial else 1.0

    @torch.no_grad()
    def _continuous_snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each quantized module's whole codebooks and scales (small), to rebuild its weight of before the P-step."""
        return {name: (whole_tensor(m.codebooks).clone(), whole_tensor(m.scales).clone())
                for name, m in self.pv_state.modules.items()}

    @torch.no_grad()
    def v_step(self, before_p_step: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
               accumulated_steps: int = 1) -> dict[str, int]:
        """Adam-like step of every proxy on its accumulated gradient (divided by `accumulated_steps`, the optimizer
        steps it sums), then re-encode the top-tau code groups (and, with `delta_decay`, pull each proxy towards its
        new dequantized weight). `before_p_step` (codebooks and scales per module as of the last V-step,
        `proxy_follows_p_step`): each proxy first moves by the P-steps' change of its weight since then."""
        cfg = self.config
        self.v_step_count += 1
        t = self.v_step_count
        beta1, beta2 = cfg.code_betas
        world = _world_size()
        generator = torch.Generator().manual_seed(cfg.code_seed + t)
        schedule = self.lr_schedule_factor()
        changed = {}
        for name, module in self.pv_state.modules.items():
            grad = self.pv_state.grads.get(name)
            if grad is None:
                changed[name] = 0
                continue
            if world > 1:
                dist.all_reduce(grad)
            if world * accumulated_steps > 1:
                grad.div_(world * accumulated_steps)
            state = self.proxies[name]
            current = whole_dequantized(module)
            if before_p_step is not None:
                codebooks, scales = before_p_step[name]
                state["proxy"].add_(current).sub_(dequantize(whole_tensor(module.codes), codebooks, scales).float())
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat = state["exp_avg"] / (1 - beta1**t)
            v_hat = state["exp_avg_sq"] / (1 - beta2**t)
            direction = m_hat.div_(v_hat.sqrt_().add_(cfg.code_eps))
            lr = cfg.code_lr * schedule
            if cfg.code_trust_ratio:
                lr = lr * float(state["proxy"].norm() / direction.norm().clamp_min(1e-30))
            state["proxy"].add_(direction, alpha=-lr)
            distance = group_distances(state["proxy"] - current, module)
            k = math.floor(cfg.max_code_change_per_step * distance.numel())
            groups = distance.topk(k).indices.sort().values if k else distance.new_zeros(0, dtype=torch.long)
            changed[name] = reencode_groups(
                module, state["proxy"], groups, beam_size=cfg.beam_size, generator=generator,
                max_chunk_bytes=cfg.max_chunk_bytes,
            )
            if world > 1 and not _is_sharded(module.codes):  # one result for every rank: rank 0's codes
                dist.broadcast(module.codes.data, src=0)
            if cfg.delta_decay:
                state["proxy"].lerp_(whole_dequantized(module), cfg.delta_decay)
        self.pv_state.clear_grads()
        self.last_changed = changed
        return changed

    def state_dict(self):
        """The P-step state and the V-step's: proxies and moments, counters, and (between V-steps, with
        `v_step_every` > 1) the gradients accumulated so far and the codebooks/scales of the last V-step."""
        return {
            "p_step": self.p_optimizer.state_dict(),
            "v_step": {"count": self.v_step_count, "proxies": {n: dict(s) for n, s in self.proxies.items()},
                       "optimizer_steps": self.optimizer_steps,
                       "pending_grads": {n: g for n, g in self.pv_state.grads.items() if g is not None},
                       "since_v_step": self._since_v_step},
        }

    def load_state_dict(self, state_dict):
        self.p_optimizer.load_state_dict(state_dict["p_step"])
        self.param_groups = self.p_optimizer.param_groups
        self.state = self.p_optimizer.state
        v_state = state_dict["v_step"]
        missing = set(self.proxies) ^ set(v_state["proxies"])
        if missing:
            raise ValueError(f"optimizer state does not match the model's quantized modules: {sorted(missing)[:5]}")
        self.v_step_count = int(v_state["count"])
        for name, held in v_state["proxies"].items():
            for key, value in held.items():
                self.proxies[name][key] = value.to(self.proxies[name][key].device, torch.float32).clone()
        self.optimizer_steps = int(v_state.get("optimizer_steps", self.v_step_count))
        self.pv_state.clear_grads()
        for name, grad in (v_state.get("pending_grads") or {}).items():
            self.pv_state.grads[name] = grad.to(self.proxies[name]["proxy"].device, torch.float32).clone()
        self._since_v_step = v_state.get("since_v_step")
