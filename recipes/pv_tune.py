"""Recipe: PV-Tune a riverone AQLM checkpoint on local text, report held-out perplexity before/after, save.

    python recipes/pv_tune.py --config recipes/configs/pv_smollm2.yaml
    python recipes/pv_tune.py --config recipes/configs/pv_smollm2.yaml --max_steps 50 --code_lr 5e-3
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/pv_tune.py --config ...        # 2 CPU ranks (gloo)
    accelerate launch --config_file recipes/accelerate/ddp_cpu_2proc.yaml recipes/pv_tune.py --config ...

Precedence: dataclass default < YAML (`--config`) < command-line flags; an unknown YAML key is an error.
Fields: RecipeArguments below, `PVTuningConfig` (V-step / what trains) and `PVTrainingArguments`
(`transformers.TrainingArguments` + the loss): `python recipes/pv_tune.py --help`.
Writes into `output_dir`: the tuned model (reload: `import riverone_hf` + `from_pretrained`), the tokenizer files
and `pv_results.json` (perplexities, settings, monotonicity summary, wall time, peak memory).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

RESULTS_NAME = "pv_results.json"


@dataclass
class RecipeArguments:
    """Which model, which teacher, which text."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "riverone AQLM checkpoint directory."})
    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "Dense checkpoint for the KL loss (the model the student was quantized from); none: cross-entropy."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Local text files to train on."})
    train_dataset_dir: str | None = field(default=None, metadata={
        "help": "Instead of train_files: a local `datasets` directory (save_to_disk) with a text column."})
    text_column: str = field(default="text", metadata={"help": "Text column of train_dataset_dir."})
    eval_files: list[str] | None = field(default=None, metadata={
        "help": "Held-out text files for perplexity before/after (none: the shipped evaluation text)."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (non-overlapping blocks)."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    held_out_blocks: int = field(default=4, metadata={
        "help": "Training blocks held out as the eval set (and the fixed monotonicity batch)."})
    ppl_seq_len: int = field(default=256, metadata={"help": "Window length of the perplexity evaluation."})
    ppl_max_windows: int | None = field(default=None, metadata={"help": "Evaluate only the first N windows."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required (a riverone AQLM checkpoint directory)")
        if bool(self.train_files) == bool(self.train_dataset_dir):
            raise ValueError("give exactly one of `train_files` and `train_dataset_dir`")
        for name in ("block_size", "ppl_seq_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"`{name}` must be >= 2, got {getattr(self, name)}")
        if self.held_out_blocks < 1:
            raise ValueError(f"`held_out_blocks` must be >= 1, got {self.held_out_blocks}")


def make_parser():
    from transformers import HfArgumentParser

    from riverone_hf.training import PVTrainingArguments, PVTuningConfig

    return HfArgumentParser((RecipeArguments, PVTuningConfig, PVTrainingArguments))


def parse(argv: list[str]):
    """`--config file.yaml` sets the defaults, the other flags override them; unknown YAML keys raise."""
    import dataclasses

    import yaml

    parser = make_parser()
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        path = argv[at + 1]
        del argv[at : at + 2]
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in {path}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)


def token_blocks(tokenizer, texts: list[str], block_size: int):
    """The texts' token streams, concatenated, cut into non-overlapping [n, block_size] blocks (tail dropped)."""
    import torch

    from riverone_hf.metrics.perplexity import tokenize_text

    stream = torch.cat([tokenize_text(tokenizer, t) for t in texts])
    n = stream.numel() // block_size
    if n < 2:
        raise ValueError(f"training text has {stream.numel()} tokens: fewer than 2 blocks of {block_size}")
    return stream[: n * block_size].view(n, block_size)


def read_texts(args: RecipeArguments) -> list[str]:
    if args.train_files:
        return [open(p, encoding="utf-8").read() for p in args.train_files]
    from datasets import load_from_disk

    data = load_from_disk(args.train_dataset_dir)
    if hasattr(data, "keys"):
        data = data["train"]
    return list(data[args.text_column])


def peak_memory_bytes() -> dict:
    import resource

    import torch

    peak = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def main(args: RecipeArguments, pv_config, training_args):
    import dataclasses
    import json
    import os
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    import riverone_hf  # noqa: F401  (registers quant_method "riverone")
    from riverone_hf.cli.demo_assets import read_shipped_text
    from riverone_hf.metrics.perplexity import perplexity
    from riverone_hf.training import PVTrainer, get_pv_model
    from riverone_hf.training.pv import trainable_parameter_summary

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    teacher = None
    if args.teacher_name_or_path:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher_name_or_path, dtype=torch.float32)
    blocks = token_blocks(tokenizer, read_texts(args), args.block_size)
    if args.held_out_blocks >= blocks.shape[0]:
        raise ValueError(f"`held_out_blocks` ({args.held_out_blocks}) leaves no training block of {blocks.shape[0]}")
    train, held = blocks[: -args.held_out_blocks], blocks[-args.held_out_blocks :]
    if args.max_train_blocks:
        train = train[: args.max_train_blocks]
    as_dataset = lambda x: Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})  # noqa: E731
    eval_text = "\n\n".join(open(p, encoding="utf-8").read() for p in args.eval_files) if args.eval_files \
        else read_shipped_text("evaluation")

    def ppl():
        return perplexity(model.eval(), tokenizer, eval_text, seq_len=args.ppl_seq_len,
                          max_windows=args.ppl_max_windows, show_progress=False)

    ppl_before = ppl()
    pv = get_pv_model(model, pv_config)
    if training_args.process_index == 0:
        pv.print_trainable_parameters()
    trainer = PVTrainer(model=pv, teacher_model=teacher, args=training_args, train_dataset=as_dataset(train),
                        eval_dataset=as_dataset(held), processing_class=tokenizer,
                        data_collator=default_data_collator)  # equal-length blocks: no padding
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    ppl_after = ppl()
    trainer.save_model(training_args.output_dir)
    results = {
        "figures": {
            "perplexity_before": ppl_before, "perplexity_after": ppl_after,
            "perplexity_definition": f"exp(mean NLL, nats) over non-overlapping {args.ppl_seq_len}-token windows "
                                     f"of the eval text (riverone_hf.metrics.perplexity)",
            "train_loss": train_result.training_loss,
            "train_blocks": int(train.shape[0]), "block_size": args.block_size,
            "optimizer_steps": trainer.state.global_step,
            "tokens_seen": trainer.state.global_step * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps * training_args.world_size * args.block_size,
            "train_seconds": train_result.metrics["train_runtime"],
        },
        "monotonicity": {"summary": trainer.monotonicity_summary(), "records": trainer.monotonicity},
        "settings": {
            "recipe": dataclasses.asdict(args), "pv_tuning": dataclasses.asdict(pv_config),
            "loss": {"kl_weight": trainer.kl_weight, "ce_weight": trainer.ce_weight,
                     "temperature": training_args.temperature},
            "training": {k: training_args.to_dict()[k] for k in (
                "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "seed", "optim", "lr_scheduler_type", "weight_decay")},
        },
        "parameters": trainable_parameter_summary(pv),
        "world_size": training_args.world_size,
        "wall_time_s": time.time() - start,
        "peak_memory": peak_memory_bytes(),
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, RESULTS_NAME), "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"perplexity {ppl_before:.3f} -> {ppl_after:.3f}; wrote {training_args.output_dir}")
    return results


def _cpu_ranks_env() -> None:
    """Several ranks and no CUDA (`accelerate launch --multi_gpu` / torchrun on a CPU box): ask accelerate for CPU
    ranks (gloo) before anything reads its state; otherwise every rank would run as 'rank 0 of 1'."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")


if __name__ == "__main__":
    _cpu_ranks_env()
    main(*parse(sys.argv[1:]))
