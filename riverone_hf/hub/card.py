"""Model cards for riverone checkpoints, rendered from the measured results JSON beside the model.

`render_card(folder, repo_id, ...)` fills huggingface_hub's `ModelCardData` (base_model, base_model_relation
"quantized", library_name, pipeline_tag, tags, license, and `EvalResult`s -> model-index) and the Jinja
template shipped in the package (`templates/riverone_model_card.md`) with `ModelCard.from_template`. Every
figure comes from ``riverone_results.json``; a figure not measured is not shown and an empty section is left out.
"""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..metrics.evaluation import load_results
from ..metrics.sizes import MIB

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "riverone_model_card.md")
SCHEME_SKIP = {"stage", "report"}
PIPELINE_TAGS = {"vision": "image-text-to-text", "text": "text-generation"}

__all__ = ["TEMPLATE_PATH", "card_data", "render_card", "stage_summaries", "aqlm_export_applies"]


def _read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _scheme_text(entry: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in SCHEME_SKIP and not isinstance(v, (dict, list)))


def stage_summaries(qconfig: dict) -> list[dict[str, str]]:
    """One line per stage: how many modules, with which settings (read from the saved quantization_map)."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for module, entry in (qconfig.get("quantization_map") or {}).items():
        grouped.setdefault(entry["stage"], {}).setdefault(_scheme_text(entry), []).append(module)
    summaries = []
    for stage, schemes in grouped.items():
        parts = [f"{len(mods)} module(s) with {scheme or 'the stage defaults'} (e.g. `{mods[0]}`)"
                 for scheme, mods in schemes.items()]
        summaries.append({"name": stage, "summary": "; ".join(parts)})
    return summaries


def aqlm_export_applies(qconfig: dict) -> bool:
    """True when `riverone export --format aqlm` can convert the checkpoint: AQLM only, one scheme, no overrides."""
    entries = list((qconfig.get("quantization_map") or {}).values())
    stages = {e["stage"] for e in entries}
    aqlm = qconfig.get("aqlm") or {}
    return stages == {"aqlm"} and not aqlm.get("overrides") and len({_scheme_text(e) for e in entries}) == 1


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def card_data(folder: str, repo_id: str, *, base_model: str | None = None, license: str | None = None,
              results: dict | None = None) -> ModelCardData:
    """The card's YAML metadata: eval_results ONLY from the results JSON of `folder`."""
    config = _read_config(folder)
    qconfig = config.get("quantization_config") or {}
    results = results if results is not None else load_results(folder)
    stages = sorted({e["stage"] for e in (qconfig.get("quantization_map") or {}).values()})
    model_name = repo_id.split("/")[-1]
    evals = [
        EvalResult(task_type=e["task"], dataset_type="text", dataset_name=e["dataset"]["name"],
                   dataset_revision=e["dataset"]["sha256"], metric_type=e["metric"], metric_value=float(e["value"]),
                   metric_config=f"seq_len={e['settings']['seq_len']}, windows={e['settings']['num_windows']}",
                   )
        for e in results.get("evaluations", [])
    ] + [
        EvalResult(task_type=e["task"], dataset_type="image-text", dataset_name=e["dataset"]["name"],
                   dataset_revision=e["dataset"]["sha256"], metric_type=e["metric"], metric_value=float(e["value"]),
                   metric_config=f"examples={e['dataset']['num_examples']}")
        for e in results.get("task_evaluations", [])
    ]
    fields: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAGS["vision" if "vision_config" in config else "text"],
        "tags": ["riverone", *(["aqlm"] if "aqlm" in stages else []), *[s for s in stages if s != "aqlm"],
                 "quantized"],
        "model_name": model_name,
    }
    if base_model:
        fields.update(base_model=base_model, base_model_relation="quantized")
    if license:
        fields["license"] = license
    if evals:
        fields["eval_results"] = evals
    return ModelCardData(**fields)


def render_card(folder: str, repo_id: str, *, base_model: str | None = None, license: str | None = None,
                template_path: str | None = None) -> ModelCard:
    """Render the model card of checkpoint `folder` (to be published as `repo_id`) from its results JSON."""
    config = _read_config(folder)
    qconfig = config.get("quantization_config") or {}
    results = load_results(folder)
    data = card_data(folder, repo_id, base_model=base_model, license=license, results=results)
    sizes = results.get("sizes") or {}
    size_ctx = None
    if sizes.get("parts_bytes"):
        size_ctx = {
            "parts": [{"name": k, "bytes": f"{v:,d}", "mib": _fmt(v / MIB)} for k, v in sizes["parts_bytes"].items()],
            "total_bytes": f"{sizes['total_bytes']:,d}", "total_mib": _fmt(sizes["total_bytes"] / MIB),
            "quantized_weights": f"{sizes.get('quantized_weights', 0):,d}",
            "bits_per_weight": (_fmt(sizes["quantized_bits_per_weight"])
                                if sizes.get("quantized_bits_per_weight") else None),
        }
    evaluations = [
        {"metric": e["metric"], "value": _fmt(e["value"]), "dataset": e["dataset"]["name"],
         "sha256": e["dataset"]["sha256"], "num_tokens": f"{e['dataset']['num_tokens']:,d}",
         "num_windows": e["settings"]["num_windows"], "seq_len": e["settings"]["seq_len"],
         "num_predicted_tokens": f"{e['settings']['num_predicted_tokens']:,d}", "definition": e.get("definition", "")}
        for e in results.get("evaluations", [])
    ]
    task_evaluations = [
        {"metric": e["metric"], "value": _fmt(e["value"]), "dataset": e["dataset"]["name"],
         "sha256": e["dataset"]["sha256"], "num_examples": f"{e['dataset']['num_examples']:,d}",
         "definition": e.get("definition", "")}
        for e in results.get("task_evaluations", [])
    ]
    pipeline = [
        {"stage": r["stage"], "bytes": f"{r['total_bytes']:,d}", "mib": _fmt(r["total_mib"], 2),
         "bits": _fmt(r["quantized_bits_per_weight"], 3) if "quantized_bits_per_weight" in r else "",
         "accuracy": _fmt(r["accuracy"]) if "accuracy" in r else "", "perplexity": _fmt(r["perplexity"], 3),
         "seconds": _fmt(r["wall_time_s"], 1)}
        for r in (results.get("pipeline") or {}).get("rows", [])
    ]
    wall = [(k, _fmt(v, 2)) for k, v in (results.get("wall_times_s") or {}).items()]
    quantized_on = (results.get("quantization") or {}).get("machine")
    return ModelCard.from_template(
        data,
        template_path=template_path or TEMPLATE_PATH,
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1],
        base_line=(f"A riverone-compressed version of [{base_model}](https://huggingface.co/{base_model})."
                   if base_model else "A riverone-compressed model."),
        auto_class="AutoModelForImageTextToText" if "vision_config" in config else "AutoModelForCausalLM",
        aqlm_export=aqlm_export_applies(qconfig),
        stages=stage_summaries(qconfig),
        sizes=size_ctx,
        evaluations=evaluations,
        task_evaluations=task_evaluations,
        pipeline=pipeline,
        command=results.get("command", ""),
        machine=sorted((results.get("machine") or {}).items()),
        wall_times=wall,
        quantization_machine=sorted(quantized_on.items()) if quantized_on else None,
    )
