"""Measure a saved checkpoint and write the figures beside it (``riverone_results.json``).

`evaluate_checkpoint(path, text_file)` loads the checkpoint as saved (``from_pretrained(path)``, so a
riverone checkpoint goes through the riverone quantizer), runs the shipped `evaluate` metric
``riverone_perplexity`` (loaded by local path: offline), measures its sizes with `size_report`, and
records the settings, the data's sha256 and token counts, the command, the machine, the wall times (with the
quantization time from ``riverone_quantization.json`` when that file describes these very weights) and
the sha256 of every weight file. Model cards are rendered ONLY from this file, and publishing refuses a
results file whose weight hashes do not match the folder: every published figure is a measurement of
that very model.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import time

RESULTS_FILE = "riverone_results.json"
QUANTIZATION_FILE = "riverone_quantization.json"  # written by `riverone quantize` beside the weights
RESULTS_FORMAT = "riverone_results"
RESULTS_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors",)
MAX_AGREEMENT_CANDIDATES = 64  # image-text agreement scores every example against every distinct answer
PERPLEXITY_DEFINITION = (
    "exp(mean NLL in nats) over non-overlapping windows of exactly seq_len tokens cut from the text's token "
    "stream (tokenised once, no special tokens; the tail shorter than seq_len dropped), seq_len - 1 "
    "predictions per window, no context across windows, float32 log-probabilities"
)

__all__ = ["MAX_AGREEMENT_CANDIDATES", "QUANTIZATION_FILE", "RESULTS_FILE", "agreement_data_problem",
           "evaluate_checkpoint", "file_sha256", "load_results", "weight_hashes", "write_quantization_record"]

logger = logging.getLogger(__name__)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(path: str) -> dict[str, str]:
    """sha256 of every weight file (``*.safetensors``) directly in checkpoint folder `path`."""
    return {name: file_sha256(os.path.join(path, name)) for name in sorted(os.listdir(path))
            if name.endswith(WEIGHT_SUFFIXES)}


def machine_info() -> dict:
    import torch
    import transformers

    from .. import __version__

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__, "riverone_hf": __version__,
            "device": "cpu"}
    return {k: v for k, v in info.items() if v is not None}


def _write_json(target: str, payload: dict) -> None:
    """Write `payload` to `target` atomically (temp file + rename)."""
    tmp = f"{target}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, target)


def write_quantization_record(path: str, source: str, seconds: float) -> None:
    """Record, beside the weights just saved in `path`, how long compressing `source` took and on which machine,
    with the weights' sha256 so that `evaluate_checkpoint` reports it only for those very weights."""
    _write_json(os.path.join(path, QUANTIZATION_FILE), {
        "format": "riverone_quantization", "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source, "wall_time_s": seconds, "machine": machine_info(), "weights_sha256": weight_hashes(path),
    })


def _quantization_record(path: str, hashes: dict[str, str]) -> dict | None:
    """The quantization record of `path` when it describes the weights there now (None otherwise)."""
    target = os.path.join(path, QUANTIZATION_FILE)
    if not os.path.isfile(target):
        return None
    with open(target, encoding="utf-8") as handle:
        record = json.load(handle)
    if record.get("weights_sha256") != hashes:
        logger.warning("%s describes other weights than those in %s (trained or re-saved since): its quantization "
                       "time is not reported", QUANTIZATION_FILE, path)
        return None
    return record


def _sizes(model) -> dict:
    from .sizes import MIB, size_report

    report = size_report(model)
    sizes = {"parts_bytes": dict(report.parts), "total_bytes": report.total_bytes,
             "total_mib": report.total_bytes / MIB}
    if report.quantized_weights:
        sizes["quantized_weights"] = report.quantized_weights
        sizes["quantized_bits_per_weight"] = report.quantized_bits_per_weight()
    return sizes


def evaluate_checkpoint(path: str, text_file: str, *, seq_len: int = 512, max_windows: int | None = None,
                        batch_size: int = 1, image_text=None, question: str | None = None, system: str | None = None,
                        command: str | None = None, write: bool = True) -> dict:
    """Measure the checkpoint folder `path` on the text in `text_file`; write ``path/riverone_results.json``.

    Args:
        path: a saved checkpoint folder (a riverone checkpoint, or a dense one as a baseline).
        text_file: UTF-8 held-out text (never the calibration text); its sha256 is recorded.
        seq_len, max_windows, batch_size: perplexity settings (see `riverone_hf.metrics.perplexity`).
        image_text: for a vision-language model, held-out `ImageQAExamples` (`riverone_hf.metrics.image_qa`) on
            which the shipped metric ``riverone_image_text_agreement`` is measured (candidates: their distinct
            answers); recorded under ``task_evaluations`` with the data's sha256.
        question, system: the prompt of `image_text` examples without their own question (see `ImageQATask`).
        command: the command line to record (the CLI passes its own); None records the call.
        write: write the JSON (atomically: temp file + rename) beside the weights.

    Returns the results dict. Raises ValueError for a missing folder or text, a text shorter than seq_len, or
    image-text data that cannot be measured: a model without a vision tower, fewer than 2 or more than
    MAX_AGREEMENT_CANDIDATES distinct answers, no question (all checked before the model loads).
    """
    import evaluate
    from transformers import AutoTokenizer

    from .. import QUANT_METHOD  # noqa: F401  (importing the package registers quant_method "riverone")
    from ..modeling.auto import auto_model_class
    from .evaluate_modules import metric_path

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a checkpoint folder: no config.json")
    if not os.path.isfile(text_file):
        raise ValueError(f"evaluation text {text_file!r} does not exist")
    with open(text_file, encoding="utf-8") as handle:
        text = handle.read()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    qconfig = config.get("quantization_config") or {}
    if image_text is not None:
        if "vision_config" not in config:
            raise ValueError(f"`image_text` data was given but {path!r} is not a vision-language model "
                             "(no vision_config)")
        problem = agreement_data_problem(image_text)
        if problem:
            raise ValueError(problem)
        if not image_text.questions and not question:
            raise ValueError(f"`question` is needed: the image-text data {image_text.name!r} has no question column")

    started = time.perf_counter()
    model = auto_model_class(path).from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - started

    metric = evaluate.load(metric_path("riverone_perplexity"))
    started = time.perf_counter()
    measured = metric.compute(predictions=[text], model=model, tokenizer=tokenizer, seq_len=seq_len,
                              max_windows=max_windows, batch_size=batch_size)
    eval_s = time.perf_counter() - started

    entries = (qconfig.get("quantization_map") or {}).values()
    hashes = weight_hashes(path)
    wall_times = {"load": load_s, "perplexity": eval_s}
    quantization = _quantization_record(path, hashes)
    if quantization is not None:
        wall_times = {"quantization": quantization["wall_time_s"], **wall_times}
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "architectures": model.config.architectures,
            "model_type": model.config.model_type,
            "quant_method": qconfig.get("quant_method"),
            "stages": sorted({e.get("stage") for e in entries if isinstance(e, dict) and e.get("stage")}),
            "weights_sha256": hashes,
        },
        "evaluations": [{
            "metric": "perplexity",
            "metric_module": "riverone_perplexity (shipped evaluate module, riverone_hf/metrics/evaluate_modules)",
            "task": "text-generation",
            "value": measured["perplexity"],
            "definition": PERPLEXITY_DEFINITION,
            "dataset": {"name": os.path.basename(text_file), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        "num_characters": len(text), "num_tokens": measured["num_tokens"]},
            "settings": {"seq_len": seq_len, "max_windows": max_windows, "batch_size": batch_size,
                         "num_windows": measured["num_windows"],
                         "num_predicted_tokens": measured["num_predicted_tokens"]},
            "wall_time_s": eval_s,
        }],
        "sizes": _sizes(model),
        "machine": machine_info(),
        "wall_times_s": wall_times,
        "command": command or f"riverone_hf.metrics.evaluation.evaluate_checkpoint({path!r}, {text_file!r}, "
                              f"seq_len={seq_len}, max_windows={max_windows}, batch_size={batch_size})",
    }
    if image_text is not None:
        results["task_evaluations"] = [_image_text_agreement(path, model, image_text, question, system)]
        wall_times["image_text_agreement"] = results["task_evaluations"][0]["wall_time_s"]
    if quantization is not None:
        results["quantization"] = {k: quantization[k] for k in ("source", "wall_time_s", "machine", "created")}
    if write:
        _write_json(os.path.join(path, RESULTS_FILE), results)
    return results


def agreement_data_problem(examples) -> str | None:
    """Why image-text agreement cannot be measured on `examples` (`ImageQAExamples`), or None when it can: it is a
    closed-set metric, each example scored against every distinct answer, for 2..MAX_AGREEMENT_CANDIDATES."""
    distinct = len(set(examples.answers))
    if distinct < 2:
        return (f"image-text data {examples.name!r} needs >= 2 distinct answers (the agreement's candidates), has "
                f"{len(examples)} examples with {distinct}")
    if distinct > MAX_AGREEMENT_CANDIDATES:
        return (f"image-text data {examples.name!r} has {distinct} distinct answers; the agreement is a closed-set "
                f"metric (each example against every distinct answer) for at most {MAX_AGREEMENT_CANDIDATES}: use "
                "data with a small answer set")
    return None


def _image_text_agreement(path: str, model, examples, question: str | None, system: str | None) -> dict:
    """The ``riverone_image_text_agreement`` entry of the results for `examples`, prompted as `ImageQATask` does."""
    import evaluate

    from .evaluate_modules import metric_path
    from .image_qa import ImageQATask

    task = ImageQATask.from_pretrained(path, question or "", system)
    scored, candidates = task.agreement_examples(examples)
    metric = evaluate.load(metric_path("riverone_image_text_agreement"))
    started = time.perf_counter()
    measured = metric.compute(references=[e.label for e in scored], model=model, examples=scored,
                              pad_token_id=task.pad_token_id)
    return {
        "metric": "image_text_agreement",
        "metric_module": "riverone_image_text_agreement (shipped evaluate module, "
                         "riverone_hf/metrics/evaluate_modules)",
        "task": "image-text-to-text",
        "value": measured["agreement"],
        "definition": "the right answer has the highest mean log-probability per token among the candidates, "
                      "given the image and the chat prompt (no generation)",
        "dataset": {"name": examples.name, "sha256": examples.sha256(), "num_examples": len(examples)},
        "settings": {"question": question if not examples.questions else None, "system": system,
                     "candidates": candidates},
        "mean_right_log_prob_per_token": measured["mean_right_log_prob_per_token"],
        "wall_time_s": time.perf_counter() - started,
    }


def load_results(path: str) -> dict:
    """The results JSON of checkpoint folder `path`; ValueError when missing or not a riverone results file."""
    target = os.path.join(path, RESULTS_FILE)
    if not os.path.isfile(target):
        raise ValueError(f"{path!r} has no {RESULTS_FILE}: run `riverone evaluate {path} --text HELD_OUT.txt` first")
    with open(target, encoding="utf-8") as handle:
        results = json.load(handle)
    if results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{target} is not a riverone results file (format {results.get('format')!r})")
    return results
