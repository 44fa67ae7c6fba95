"""PV-Tuning: config errors, the V-step (at most tau of the code groups, aqlm layout), the loss going down,
the plain Trainer machinery, save/reload in a fresh process, the CPU kernel following the trained parameters."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import AqlmLinear
from riverone_hf.aq.layout import code_dtype, unpack_codes
from riverone_hf.training import PVTrainer, PVTrainingArguments, PVTuningConfig, get_pv_model
from riverone_hf.training.pv import PVOptimizer, reencode_groups, trainable_parameter_summary
from riverone_hf.training.pv.vstep import whole_dequantized
from tests.tiny_models import input_ids, tiny_qwen3

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def token_dataset(rows=16, length=24, seed=0):
    ids = torch.randint(1, 97, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def pv_args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return PVTrainingArguments(**{**fields, **overrides})


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AqlmLinear)}


# -- config errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"max_code_change_per_step": 0.0}, "max_code_change_per_step"),
        ({"max_code_change_per_step": 1.5}, "max_code_change_per_step"),
        ({"beam_size": 0}, "beam_size"),
        ({"code_lr": -1.0}, "code_lr"),
        ({"code_betas": (0.0, 1.0)}, "code_betas"),
        ({"delta_decay": -0.1}, "delta_decay"),
        ({"delta_decay": 1.5}, "delta_decay"),
        ({"v_step_every": 0}, "v_step_every"),
        ({"v_step_every": 1.5}, "v_step_every"),
        ({"modules_to_train": []}, "modules_to_train"),
        ({"modules_to_train": "("}, "modules_to_train"),
    ],
)
def test_config_rejects_bad_values(fields, name):
    with pytest.raises(ValueError, match=name):
        PVTuningConfig(**fields)


def test_arguments_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        pv_args(tmp_path, temperature=0.0)
    with pytest.raises(ValueError, match="monotonicity_every"):
        pv_args(tmp_path, monotonicity_every=-1)


def test_model_without_aqlm_linear_is_an_error():
    with pytest.raises(ValueError, match="AqlmLinear"):
        get_pv_model(tiny_qwen3(), PVTuningConfig())


def test_kl_without_teacher_and_vocab_mismatch_are_errors(pv_dirs, tmp_path):
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized))
    with pytest.raises(ValueError, match="kl_weight"):
        PVTrainer(model=model, args=pv_args(tmp_path, kl_weight=1.0), train_dataset=token_dataset())
    with pytest.raises(ValueError, match="vocabulary"):
        PVTrainer(model=model, args=pv_args(tmp_path), teacher_model=tiny_qwen3(vocab_size=256),
                  train_dataset=token_dataset())


def test_kl_divergence_is_zero_on_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    zero, count = PVTrainer.kl_divergence(logits, logits, mask)
    assert float(zero) == pytest.approx(0.0, abs=1e-6) and int(count) == 10
    assert float(PVTrainer.kl_divergence(logits, torch.randn(2, 5, 11), mask)[0]) > 0


# -- get_pv_model and the V-step -----------------------------------------------------------------------------------


def test_get_pv_model_marks_trainable_and_counts_codes_apart(pv_dirs, capsys):
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized))
    for module in quantized_modules(model).values():
        assert module.codebooks.requires_grad and module.scales.requires_grad and not module.codes.requires_grad
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    summary = model.print_trainable_parameters()
    assert "codes" in capsys.readouterr().out
    assert summary == trainable_parameter_summary(model)
    assert summary["codes"] == sum(m.codes.numel() for m in quantized_modules(model).values())
    assert summary["codes_bytes"] == summary["codes"]  # int8 codes: one byte each


def test_modules_to_train_are_trained_in_full_and_must_exist(pv_dirs):
    """peft's convention, like its modules_to_save: a name / dotted suffix list, or one regex string."""
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized), PVTuningConfig(modules_to_train=["lm_head"]))
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    model = get_pv_model(load(quantized), PVTuningConfig(modules_to_train=r"model\.embed_tokens"))
    assert model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="`modules_to_train` entry 'multi_modal_projector' names no module"):
        get_pv_model(load(quantized), PVTuningConfig(modules_to_train=["multi_modal_projector"]))


def test_reencode_groups_never_worse_and_keeps_layout(pv_dirs):
    _, quantized = pv_dirs
    module = next(iter(quantized_modules(load(quantized)).values()))
    before = module.codes.clone()
    target = module.dequantize().detach() + 0.05 * torch.randn(module.out_features, module.in_features,
                                                                 generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 3, 7])
    error_before = (module.dequantize() - target).square().sum()
    reencode_groups(module, target, groups, beam_size=3, generator=torch.Generator().manual_seed(0),
                    max_chunk_bytes=2**12)
    assert module.codes.dtype == code_dtype(8) and module.codes.shape == before.shape
    flat_changed = (module.codes != before).any(-1).reshape(-1).nonzero().reshape(-1)
    assert set(flat_changed.tolist()) <= set(groups.tolist())
    assert (module.dequantize() - target).square().sum() <= error_before + 1e-6


def test_one_pv_step_changes_at_most_tau_of_code_groups(pv_dirs, tmp_path):
    _, quantized = pv_dirs
    tau = 0.05
    model = get_pv_model(load(quantized), PVTuningConfig(code_lr=0.5, max_code_change_per_step=tau, beam_size=2))
    before = {n: m.codes.clone() for n, m in quantized_modules(model).items()}
    trainer = PVTrainer(model=model, args=pv_args(tmp_path, max_steps=1, monotonicity_every=0),
                        train_dataset=token_dataset())
    trainer.train()
    total_changed = 0
    for name, module in quantized_modules(model).items():
        assert module.codes.dtype == torch.int8 and module.codes.shape == before[name].shape
        changed = int((module.codes != before[name]).any(-1).sum())
        groups = module.codes.shape[0] * module.codes.shape[1]
        assert changed <= int(tau * groups), name
        total_changed += changed
        assert int(unpack_codes(module.codes, 8).max()) < 256
    assert total_changed > 0  # the V-step did move codes
    assert total_changed == sum(trainer.pv_optimizer.last_changed.values())


@pytest.mark.parametrize("decay", [0.0, 0.25, 1.0])
def test_delta_decay_pulls_the_proxy_to_the_new_dequantized_weight(pv_dirs, decay):
    """After the V-step the proxy is (1 - decay) x the straight-through proxy + decay x the dequantized weight."""
    _, quantized = pv_dirs

    def proxy_after_step(delta_decay):
        model = get_pv_model(load(quantized), PVTuningConfig(max_code_change_per_step=0.05, beam_size=2,
                                                             delta_decay=delta_decay))
        optimizer = PVOptimizer(torch.optim.AdamW([model.model.norm.weight], lr=1e-3), model.pv_state)
        name = next(iter(model.pv_state.modules))
        model.pv_state.grads[name] = torch.randn(optimizer.proxies[name]["proxy"].shape,
                                                 generator=torch.Generator().manual_seed(0))
        optimizer.v_step()
        return optimizer.proxies[name]["proxy"], whole_dequantized(model.pv_state.modules[name])

    straight, dequantized = proxy_after_step(0.0)
    decayed, dequantized_too = proxy_after_step(decay)
    assert torch.equal(dequantized, dequantized_too)  # the re-encoding happens before the decay: same codes
    torch.testing.assert_close(decayed, (1 - decay) * straight + decay * dequantized, rtol=1e-6, atol=1e-7)
    assert not torch.equal(straight, dequantized)  # the straight-through proxy is not on the codes' grid


@pytest.mark.parametrize("follows", [False, True])
def test_proxy_follows_the_p_steps_change_of_the_weight_only_when_asked(pv_dirs, follows):
    """With the proxy's own step at 0 (lr schedule 0), a P-step change of the codebooks moves the proxy by exactly
    the change of the dequantized weight with `proxy_follows_p_step`, and leaves it where it was without."""
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized), PVTuningConfig(max_code_change_per_step=0.05, beam_size=2,
                                                         proxy_follows_p_step=follows))
    optimizer = PVOptimizer(torch.optim.AdamW([model.model.norm.weight], lr=1e-3), model.pv_state)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    name, module = next(iter(model.pv_state.modules.items()))
    model.pv_state.grads[name] = torch.randn(optimizer.proxies[name]["proxy"].shape,
                                             generator=torch.Generator().manual_seed(0))
    start = optimizer.proxies[name]["proxy"].clone()
    snapshot = optimizer._continuous_snapshot()
    with torch.no_grad():
        module.codebooks.mul_(1.1)  # what a P-step does: new codebooks, same codes
    moved = whole_dequantized(module) - start
    optimizer.v_step(snapshot if follows else None)
    expected = start + moved if follows else start
    torch.testing.assert_close(optimizer.proxies[name]["proxy"], expected, rtol=1e-6, atol=1e-7)
    assert moved.abs().max() > 1e-3


def test_v_step_every_k_steps_uses_their_mean_gradient_and_resumes_between_v_steps(pv_dirs):
    """v_step_every=3: no V-step at steps 1-2, then one on the mean of the 3 gradients, equal to v_step_every=1 fed
    that mean; an optimizer reloaded from the state dict after step 1 ends with the same codes and proxy."""
    _, quantized = pv_dirs
    gradients = [torch.randn(64, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def optimizer_for(every):
        model = get_pv_model(load(quantized), PVTuningConfig(code_lr=0.5, max_code_change_per_step=0.05,
                                                             beam_size=2, v_step_every=every))
        optimizer = PVOptimizer(torch.optim.AdamW([model.model.norm.weight], lr=0.0), model.pv_state)
        name, module = next(iter(model.pv_state.modules.items()))
        assert optimizer.proxies[name]["proxy"].shape == gradients[0].shape
        return model, optimizer, name, module

    def backward(model, name, grad):  # what the gradient hooks do: sum into the accumulator
        held = model.pv_state.grads[name]
        model.pv_state.grads[name] = grad.clone() if held is None else held + grad

    model, optimizer, name, module = optimizer_for(3)
    codes, proxy = module.codes.clone(), optimizer.proxies[name]["proxy"].clone()
    for step, grad in enumerate(gradients[:2], start=1):
        backward(model, name, grad)
        optimizer.step()
        assert optimizer.v_step_count == 0 and torch.equal(module.codes, codes)
        assert torch.equal(optimizer.proxies[name]["proxy"], proxy)
        if step == 1:
            saved = copy.deepcopy(optimizer.state_dict())  # as torch.save would keep it
            assert set(saved["v_step"]["pending_grads"]) == {name}
    backward(model, name, gradients[2])
    optimizer.step()
    assert optimizer.v_step_count == 1 and not torch.equal(module.codes, codes)

    reference, single, ref_name, ref_module = optimizer_for(1)
    backward(reference, ref_name, sum(gradients) / 3)
    single.step()
    torch.testing.assert_close(optimizer.proxies[name]["proxy"], single.proxies[ref_name]["proxy"])
    assert torch.equal(module.codes, ref_module.codes)

    resumed_model, resumed, _, resumed_module = optimizer_for(3)
    resumed.load_state_dict(saved)
    for grad in gradients[1:]:
        backward(resumed_model, name, grad)
        resumed.step()
    assert resumed.v_step_count == 1 and torch.equal(resumed_module.codes, module.codes)
    torch.testing.assert_close(resumed.proxies[name]["proxy"], optimizer.proxies[name]["proxy"])


def test_v_step_every_with_several_processes_needs_checkpoints_on_v_steps():
    from types import SimpleNamespace

    from riverone_hf.training.pv.trainer import _check_v_step_every_against_checkpoints

    config = PVTuningConfig(v_step_every=4)
    args = SimpleNamespace(world_size=2, save_strategy="steps", save_steps=6)
    with pytest.raises(ValueError, match="v_step_every.*save_steps"):
        _check_v_step_every_against_checkpoints(config, args)
    for ok in (SimpleNamespace(world_size=2, save_strategy="steps", save_steps=8),
               SimpleNamespace(world_size=2, save_strategy="no", save_steps=6),
               SimpleNamespace(world_size=1, save_strategy="epoch", save_steps=6)):
        _check_v_step_every_against_checkpoints(config, ok)


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_v_step_lr_follows_the_p_step_schedule(pv_dirs, factor):
    """A scheduler at `factor` x the initial lr scales the proxy's step by `factor` (0: the proxy stays put)."""
    _, quantized = pv_dirs

    def proxy_moves(schedule):
        model = get_pv_model(load(quantized), PVTuningConfig(max_code_change_per_step=0.05, beam_size=2))
        optimizer = PVOptimizer(torch.optim.AdamW([model.model.norm.weight], lr=1e-3), model.pv_state)
        if schedule is not None:
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule)
        name = next(iter(model.pv_state.modules))
        model.pv_state.grads[name] = torch.randn(optimizer.proxies[name]["proxy"].shape,
                                                 generator=torch.Generator().manual_seed(0))
        before = optimizer.proxies[name]["proxy"].clone()
        optimizer.v_step()
        return float((optimizer.proxies[name]["proxy"] - before).norm())

    unscheduled = proxy_moves(None)
    assert unscheduled > 0
    assert proxy_moves(factor) == pytest.approx(factor * unscheduled, rel=1e-5, abs=1e-12)


def test_loss_goes_down_and_monotonicity_is_logged(pv_dirs, tmp_path):
    dense, quantized = pv_dirs
    model = get_pv_model(load(quantized), PVTuningConfig(code_lr=0.05, max_code_change_per_step=0.05, beam_size=2))
    dataset = token_dataset()
    trainer = PVTrainer(model=model, teacher_model=load(dense), train_dataset=dataset, eval_dataset=dataset,
                        args=pv_args(tmp_path, max_steps=6, learning_rate=3e-3, per_device_eval_batch_size=4))
    initial = trainer.evaluate()["eval_loss"]
    trainer.train()
    final = trainer.evaluate()["eval_loss"]
    assert final < initial
    records = trainer.monotonicity
    assert len(records) == 6 and all({"before", "after_p", "after_v"} <= set(r) for r in records)
    assert records[-1]["after_v"] < records[0]["before"]
    logged = [entry for entry in trainer.state.log_history if "pv/loss_after_v" in entry]
    assert len(logged) == 6
    summary = [entry for entry in trainer.state.log_history if "pv/p_step_lowered_fraction" in entry]
    assert summary and summary[-1]["pv/measured_steps"] == 6


def test_with_v_step_every_only_steps_with_a_v_step_are_measured(pv_dirs, tmp_path):
    dense, quantized = pv_dirs
    model = get_pv_model(load(quantized), PVTuningConfig(code_lr=0.05, max_code_change_per_step=0.05, beam_size=2,
                                                         v_step_every=2))
    trainer = PVTrainer(model=model, teacher_model=load(dense), train_dataset=token_dataset(),
                        args=pv_args(tmp_path, max_steps=4, learning_rate=3e-3))
    trainer.train()
    assert [r["step"] for r in trainer.monotonicity] == [2, 4] and trainer.pv_optimizer.v_step_count == 2


# -- save / reload, kernels following the trained parameters ------------------------------------------------------


RELOAD = """
import sys, torch, riverone_hf
from transformers import AutoModelForCausalLM
from tests.tiny_models import input_ids
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(input_ids=input_ids()).logits, sys.argv[2])
"""


def test_trained_model_saves_reloads_in_fresh_process_and_kernels_follow(pv_dirs, tmp_path):
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized), PVTuningConfig(code_lr=0.5, max_code_change_per_step=0.05, beam_size=2))
    original = {n: (m.codes.clone(), m.codebooks.detach().clone()) for n, m in quantized_modules(model).items()}
    # run the CPU kernels once before training so that a stale cache would show
    with torch.no_grad():
        model(input_ids=input_ids())
    trainer = PVTrainer(model=model, args=pv_args(tmp_path, max_steps=2, monotonicity_every=0),
                        train_dataset=token_dataset())
    trainer.train()
    model.eval()
    codes_moved = any((m.codes != original[n][0]).any() for n, m in quantized_modules(model).items())
    books_moved = any(not torch.equal(m.codebooks, original[n][1]) for n, m in quantized_modules(model).items())
    assert codes_moved and books_moved
    for name, module in quantized_modules(model).items():
        with torch.no_grad():
            x_in = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(module(x_in), F.linear(x_in, module.dequantize(), module.bias),
                                       rtol=1e-4, atol=1e-5, msg=name)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits
    subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "logits.pt")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "riverone"


def test_optimizer_state_holds_fp32_proxies(pv_dirs, tmp_path):
    _, quantized = pv_dirs
    model = get_pv_model(load(quantized))
    trainer = PVTrainer(model=model, args=pv_args(tmp_path, max_steps=1, monotonicity_every=0),
                        train_dataset=token_dataset())
    trainer.train()
    assert isinstance(trainer.pv_optimizer, PVOptimizer)
    state = trainer.pv_optimizer.state_dict()["v_step"]
    assert state["count"] == 1
    for held in state["proxies"].values():
        assert all(t.dtype == torch.float32 for t in held.values())
