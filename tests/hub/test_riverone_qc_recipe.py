"""recipes/riverone_qc.py end to end on a tiny random InternVL: all four stages (a few steps each), the per-stage
table, results JSON and card, publishing to the test Hub server, loading back by repo id in a fresh process with
identical outputs, `--resume` (a changed stage runs again with the stages after it), and config errors."""

import json
import os
import sys

import pytest
import torch
import yaml

from tests.hub.conftest import REPO_ROOT, run_python
from tests.hub.hub_server import TOKEN
from tests.tiny_models import FAST_AQLM, save_image_answer_dataset, save_tiny_chat_internvl

sys.path.insert(0, os.path.join(REPO_ROOT, "recipes"))
import riverone_qc  # noqa: E402

REPO_ID = "org/riverone-qc-tiny"
STAGES = ["original", "minivit", "vqc", "aqlm", "pv"]


def config(tmp_path, **pipeline) -> dict:
    return {
        "pipeline": {"model": str(tmp_path / "dense"), "output_dir": str(tmp_path / "out"), "data": str(tmp_path / "data"),
                     "question": "Which digit?", "system": None, "ppl_seq_len": 64, "ppl_windows": 2, **pipeline},
        "minivit": {"groups": [[0, 1]], "distill": {"steps": 2}},
        "vqc": {"target_modules": ["multi_modal_projector.linear_2"], "n_wires": 2, "n_layers": 1, "rank": 2,
                "hidden_size": 4, "chunk_size": 8, "init_steps": 3, "baselines": False},
        "aqlm": {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, **FAST_AQLM},
        "pv": {"tuning": {"beam_size": 1},
               "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-4,
                            "report_to": "none", "save_strategy": "no", "use_cpu": True}},
    }


def write(tmp_path, values: dict, name: str = "qc.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def recipe_code(argv: list[str]) -> str:
    return (f"import runpy, sys; sys.argv = {['recipes/riverone_qc.py', *argv]!r}; "
            "runpy.run_path('recipes/riverone_qc.py', run_name='__main__')")


LOAD_AND_SAVE_OUTPUTS = """
import sys, torch, riverone_hf
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
ids = torch.tensor([[model.config.image_token_id, 40, 41, 42, 43]])
pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    save_file({"logits": model(input_ids=ids, pixel_values=pixels).logits.contiguous()}, sys.argv[2])
"""


def outputs_of(source: str, target: str, env: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    run_python(f"import sys; sys.argv = ['-', {source!r}, {target!r}]\n" + LOAD_AND_SAVE_OUTPUTS, env)
    return load_file(target)["logits"]


def test_whole_recipe_publish_load_back_and_resume(hub, hub_env, tmp_path):
    save_tiny_chat_internvl(tmp_path / "dense")
    save_image_answer_dataset(tmp_path / "data")
    values = config(tmp_path, push_to_hub=True, hub_model_id=REPO_ID)
    first = run_python(recipe_code(["--config", write(tmp_path, values)]), hub_env, timeout=300)
    assert "published" in first.stdout

    out = tmp_path / "out"
    assert sorted(os.listdir(out / "stages")) == [f"{i}-{name}" for i, name in enumerate(STAGES)]
    results = json.loads((out / "model" / "riverone_results.json").read_text())
    rows = results["pipeline"]["rows"]
    assert [r["stage"] for r in rows] == STAGES
    assert rows[0]["total_bytes"] > rows[1]["total_bytes"] > rows[3]["total_bytes"]  # sharing, then AQLM, shrink
    assert rows[-1]["examples"] == 4 and results["task_evaluations"][0]["value"] == rows[-1]["accuracy"]
    assert results["model"]["stages"] == ["aqlm", "minivit", "vqc"]
    card = (out / "model" / "README.md").read_text()
    assert "## Stage by stage" in card and "| pv |" in card and "## Task evaluation" in card and "image_text_agreement" in card

    # by repo id, in a fresh process, through the Hub cache: the same outputs as the local final folder
    local = outputs_of(str(out / "model"), str(tmp_path / "local.safetensors"), hub_env)
    remote = outputs_of(REPO_ID, str(tmp_path / "remote.safetensors"), hub_env)
    assert torch.equal(local, remote)

    # --resume with the pv stage changed: the four earlier stages are reused, pv runs again
    stamps = {name: os.path.getmtime(out / "stages" / name / riverone_qc.ROW_FILE) for name in os.listdir(out / "stages")}
    values["pv"]["training"]["max_steps"] = 1
    values["pipeline"].update(push_to_hub=False)
    again = run_python(recipe_code(["--config", write(tmp_path, values, "qc2.yaml"), "--resume"]), hub_env, timeout=300)
    assert again.stdout.count("(completed earlier)") == 4
    for name, stamp in stamps.items():
        changed = os.path.getmtime(out / "stages" / name / riverone_qc.ROW_FILE) != stamp
        assert changed == name.endswith("-pv"), name


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(extra={}), r"unknown section\(s\) \['extra'\]"),
    (lambda c: c["aqlm"].update(bits=2), "bits"),
    (lambda c: c["minivit"]["distill"].update(stepz=2), r"unknown key\(s\) in `minivit.distill`: stepz"),
    (lambda c: c["pv"].update(schedule={}), r"unknown key\(s\) in `pv`"),
    (lambda c: c["pv"]["training"].update(output_dir="x"), "set by the recipe"),
    (lambda c: c["pipeline"].update(push_to_hub=True), "needs `hub_model_id`"),
    (lambda c: c["vqc"].update(target_modules="("), "vqc.target_modules"),
    (lambda c: c["pipeline"].update(hub_model_id="org/bad name"), "`pipeline.hub_model_id`"),
    (lambda c: c["pipeline"].update(dtype="float8"), "dtype"),
], ids=["section", "stage-key", "distill-key", "pv-key", "pv-output-dir", "push-without-id", "bad-regex",
        "bad-repo-id", "bad-dtype"])
def test_config_errors_name_the_field(tmp_path, change, message):
    values = config(tmp_path)
    change(values)
    with pytest.raises(ValueError, match=message):
        riverone_qc.parse(["--config", write(tmp_path, values)])


def test_plan_errors_before_any_work(tmp_path, qwen3_dir):
    values = config(tmp_path)
    del values["aqlm"]
    with pytest.raises(ValueError, match="add an `aqlm` section"):
        riverone_qc.check_plan(riverone_qc.parse(["--config", write(tmp_path, values)]), is_vlm=True)
    values = config(tmp_path, model=qwen3_dir)
    with pytest.raises(ValueError, match="needs a vision-language model"):
        riverone_qc.check_plan(riverone_qc.parse(["--config", write(tmp_path, values)]), is_vlm=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    with pytest.raises(ValueError, match="not empty: pass --resume"):
        riverone_qc.run(riverone_qc.parse(["--config", write(tmp_path, config(tmp_path, model=qwen3_dir))]))


def test_refused_token_stops_a_publishing_run_before_any_stage(hub, hub_env, tmp_path, monkeypatch):
    from riverone_hf.hub import HubError

    save_tiny_chat_internvl(tmp_path / "dense")
    save_image_answer_dataset(tmp_path / "data")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    plan = riverone_qc.parse(["--config", write(tmp_path, config(tmp_path, push_to_hub=True, hub_model_id=REPO_ID))])
    with pytest.raises(HubError, match="refused the token"):
        riverone_qc.run(plan)
    assert not (tmp_path / "out").exists()  # no stage ran, nothing written
