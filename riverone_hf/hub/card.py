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

from ..config import registered_stages
from ..metrics.evaluation import load_results
from ..metrics.sizes import MIB

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "riverone_model_card.md")
SCHEME_SKIP = {"stage", "report"}
SETTINGS_SKIP = {"overrides", "calibration"}  # overrides show as their own schemes; calibration has its own text
PIPELINE_TAGS = {"vision": "image-text-to-text", "text": "text-generation"}

__all__ = ["TEMPLATE_PATH", "card_data", "render_card", "stage_settings", "stage_summaries", "aqlm_export_applies"]


def _read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _scheme_text(entry: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in SCHEME_SKIP and not isinstance(v, (dict, list)))


def stage_summaries(qconfig: dict) -> list[dict[str, str]]:
    """One entry per stage: how many modules with which scheme (from the saved quantization_map) and the settings
    the stage ran with (from its spec in the quantization_config)."""
    grouped: dict[str, dict[str, list[str]]] = {}
    settings = stage_settings(qconfig)
    for module, entry in (qconfig.get("quantization_map") or {}).items():
        grouped.setdefault(entry["stage"], {}).setdefault(_scheme_text(entry), []).append(module)
    summaries = []
    for stage, schemes in grouped.items():
        parts = [f"{len(mods)} module(s) with {scheme or 'the stage defaults'} (e.g. `{mods[0]}`)"
                 for scheme, mods in schemes.items()]
        summaries.append({"name": stage, "summary": "; ".join(parts), "settings": settings.get(stage, "")})
    return summaries


def _setting_value(value: Any) -> str:
    """A setting as the card shows it: local paths reduced to their file names (the card is public)."""
    if isinstance(value, str):
        return os.path.basename(value) if os.sep in value else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting_value(v) for v in value) + "]"
    return str(value)


def _settings_text(spec: dict, quote: bool = True) -> str:
    """`key=value` for every setting that is set; a nested spec (block_finetune) in parentheses, or `off`."""
    parts = []
    for key, value in sorted(spec.items()):
        if value is None or value == [] or key in SETTINGS_SKIP:
            continue
        if isinstance(value, dict):
            value = "(" + _settings_text(value, quote=False) + ")" if value.get("enabled", True) else "off"
        else:
            value = _setting_value(value)
        parts.append(f"`{key}={value}`" if quote else f"{key}={value}")
    return ", ".join(parts)


def _aqlm_data_text(spec: dict) -> str:
    calibration = spec.get("calibration")
    if not calibration:
        return "data-free (no calibration data)"
    source = calibration.get("text_files") or [calibration.get("dataset_path")]
    return (f"calibrated on {calibration['num_samples']} windows x {calibration['seq_len']} tokens of "
            f"{', '.join(_setting_value(s) for s in source)}")


def stage_settings(qconfig: dict) -> dict[str, str]:
    """Per stage, the settings it was run with (its spec in the saved quantization_config), as one line."""
    settings = {}
    for stage in registered_stages():  # each stage's spec is the quantization_config key of its name
        spec = qconfig.get(stage)
        if spec:
            text = _settings_text(spec)
            settings[stage] = f"{_aqlm_data_text(spec)}; {text}" if stage == "aqlm" else text
    return settings


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
    card = ModelCard.from_template(
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
    card.content = _single_blank_lines(card.content)
    return card


def _single_blank_lines(markdown: str) -> str:
    """Collapse the runs of blank lines that empty Jinja blocks leave, outside fenced code blocks."""
    lines, in_fence = [], False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not line.strip() and lines and not lines[-1].strip():
            continue
        lines.append(line)
    return "\n".join(lines)
