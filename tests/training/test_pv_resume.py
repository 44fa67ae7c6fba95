"""PV-Tuning resume: --resume_from_checkpoint continues with the same codes, proxies and optimizer states, so
a resumed run ends where an uninterrupted one does."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import AqlmLinear
from riverone_hf.training import PVTrainer, PVTuningConfig, get_pv_model
from tests.training.test_pv_tuning import pv_args, token_dataset


@pytest.fixture
def quantized_dir(pv_dirs):
    return pv_dirs[1]


def run(quantized_dir, output_dir, resume=None, stop_after=None):
    model = get_pv_model(AutoModelForCausalLM.from_pretrained(quantized_dir),
                         PVTuningConfig(code_lr=0.3, max_code_change_per_step=0.05, beam_size=2))
    args = pv_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, monotonicity_every=0,
                   learning_rate=3e-3)
    trainer = PVTrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_resume_equals_uninterrupted(quantized_dir, tmp_path):
    full, full_trainer = run(quantized_dir, tmp_path / "full")
    checkpoint = tmp_path / "full" / "run" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed, resumed_trainer = run(quantized_dir, tmp_path / "resumed", resume=str(checkpoint))
    assert resumed_trainer.pv_optimizer.v_step_count == 4
    for (name, a), (_, b) in zip(full.named_modules(), resumed.named_modules()):
        if isinstance(a, AqlmLinear):
            assert torch.equal(a.codes, b.codes), name
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for name, held in full_trainer.pv_optimizer.proxies.items():
        for key, value in held.items():
            torch.testing.assert_close(value, resumed_trainer.pv_optimizer.proxies[name][key], rtol=1e-5, atol=1e-6)
