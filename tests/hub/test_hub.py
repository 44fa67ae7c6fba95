"""The Hub path against a Hub-compatible HTTP server on 127.0.0.1 (tests/hub/hub_server.py) with the real
huggingface_hub client: publish (one commit, idempotent, card + eval results read back), from_pretrained by
repo id of every stage kind (identical outputs), revisions, the offline cache, transformers' push_to_hub,
and clear, fast errors (unreachable endpoint, bad token, incomplete folder before any request)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard

from riverone_hf.hub import HubError, check_checkpoint, publish
from riverone_hf.metrics.evaluation import RESULTS_FILE
from tests.hub.conftest import reference_path, run_python
from tests.hub.hub_server import TOKEN

# Run in a fresh interpreter: load each (repo, revision) by repo id and compare with the reference outputs.
LOAD = """
import json, sys, torch
torch.set_num_threads(1)  # the same reduction order as the in-process reference (tests run on one thread)
import riverone_hf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from tests.hub.conftest import reference_outputs
for repo, revision, reference, vlm in json.loads(sys.argv[1] if len(sys.argv) > 1 else {cases!r}):
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = auto.from_pretrained(repo, **({{"revision": revision}} if revision else {{}}))
    got, want = reference_outputs(model), load_file(reference)
    assert set(got) == set(want), (repo, set(got), set(want))
    for key in want:
        assert torch.equal(got[key], want[key]), (repo, revision, key)
    print("loaded", repo, revision, sorted(want))
"""


def load_code(cases) -> str:
    return LOAD.format(cases=json.dumps(cases))


def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


def commits_posted(hub) -> int:
    return sum(1 for method, path in hub.state.requests if method == "POST" and "/commit/" in path)


def test_publish_round_trip_card_and_idempotence(hub, hub_env, checkpoint, tmp_path):
    folder = checkpoint("aqlm")
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    api(hub).create_repo("org/base-model")
    api(hub).upload_folder(repo_id="org/base-model", folder_path=str(base))

    command = ["recipes/publish.py", folder, "--repo-id", "org/tiny-riverone", "--base-model", "org/base-model"]
    code = f"import runpy, sys; sys.argv = {command!r}; runpy.run_path('recipes/publish.py', run_name='__main__')"
    first = run_python(code, hub_env)
    assert "repo: " + hub.url + "/org/tiny-riverone" in first.stdout and TOKEN not in first.stdout + first.stderr
    info = api(hub).model_info("org/tiny-riverone")
    assert f"commit: {info.sha}" in first.stdout
    before = commits_posted(hub)
    again = publish(folder, "org/tiny-riverone", token=TOKEN, base_model="org/base-model")
    assert again.commit_oid == info.sha and commits_posted(hub) == before  # nothing new uploaded

    files = {s.rfilename for s in info.siblings}
    # the weights went through git LFS (batch, PUT, verify), as on the Hub; the rest inline in the commit
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in hub.state.requests)
    tree = {f.path: f for f in api(hub).list_repo_tree("org/tiny-riverone")}
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", RESULTS_FILE} <= files
    card = info.card_data
    assert card["base_model"] == "org/base-model" and card["base_model_relation"] == "quantized"
    assert card["license"] == "apache-2.0" and card["library_name"] == "transformers"
    assert card["pipeline_tag"] == "text-generation" and {"riverone", "aqlm"} <= set(card["tags"])

    with urllib.request.urlopen(f"{hub.url}/org/tiny-riverone/resolve/main/README.md", timeout=10) as response:
        text = response.read().decode()
    card = ModelCard(text)  # huggingface_hub parses the YAML header and model-index back
    results = json.loads(open(os.path.join(folder, RESULTS_FILE)).read())
    measured = results["evaluations"][0]
    [evaluation] = card.data.eval_results
    assert evaluation.metric_type == "perplexity" and evaluation.metric_value == measured["value"]
    assert evaluation.task_type == "text-generation" and evaluation.dataset_name == "held_out.txt"
    assert evaluation.metric_config == "seq_len=16, windows=4" and card.data.model_name == "tiny-riverone"
    entry = yaml.safe_load(text.split("---")[1])["model-index"][0]["results"][0]
    assert entry["dataset"]["revision"] == measured["dataset"]["sha256"]
    assert "**This checkpoint needs `pip install riverone_hf` and `import riverone_hf`" in text
    assert "riverone export THIS_FOLDER OUT --format aqlm" in text  # AQLM-only, one scheme
    assert f"{results['sizes']['total_bytes']:,d}" in text and "bits/weight" in text
    assert f"{measured['value']:.4f}" in text and measured["dataset"]["sha256"] in text and results["command"] in text
    assert "wall time, perplexity" in text
    assert "settings: data-free (no calibration data);" in text and "`block_finetune=off`" in text
    assert "\n\n\n" not in text  # empty template blocks leave no runs of blank lines


def test_load_by_repo_id_every_stage_kind_revisions_then_offline(hub, hub_env, checkpoint):
    cases = []
    for kind in ("aqlm", "minivit", "vqc", "mixed"):
        folder = checkpoint(kind)
        publish(folder, f"org/load-{kind}", token=TOKEN)
        cases.append([f"org/load-{kind}", None, reference_path(folder), kind in ("minivit", "mixed")])
    # revisions: a commit sha, a branch, and main after a later commit
    aqlm, vqc = checkpoint("aqlm"), checkpoint("vqc")
    first = publish(aqlm, "org/revisions", token=TOKEN)
    branch = publish(vqc, "org/revisions", token=TOKEN, revision="experiment")
    latest = publish(vqc, "org/revisions", token=TOKEN)
    assert len({first.commit_oid, branch.commit_oid, latest.commit_oid}) == 3
    assert api(hub).model_info("org/revisions", revision="experiment").sha == branch.commit_oid
    revisions = [["org/revisions", first.commit_oid, reference_path(aqlm), False],
                 ["org/revisions", "experiment", reference_path(vqc), False],
                 ["org/revisions", None, reference_path(vqc), False]]
    snapshot = ("from huggingface_hub import snapshot_download\n"
                "print('snapshot', snapshot_download('org/load-mixed'))\n")
    result = run_python(load_code(cases + revisions) + snapshot, hub_env)
    assert result.stdout.count("loaded") == 7
    snapshot_dir = result.stdout.split("snapshot ")[-1].strip()
    assert os.path.isfile(os.path.join(snapshot_dir, "model.safetensors"))

    # the cache filled above serves the same loads (by repo id and revision, and the snapshot folder) with
    # HF_HUB_OFFLINE=1: nothing reaches the server
    requests = len(hub.state.requests)
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    cases += [revisions[0], [snapshot_dir, None, reference_path(checkpoint("mixed")), True]]
    assert run_python(load_code(cases), offline).stdout.count("loaded") == len(cases)
    assert len(hub.state.requests) == requests


def test_transformers_push_to_hub(hub, hub_env, checkpoint):
    folder = checkpoint("aqlm")
    publish(folder, "org/push-source", token=TOKEN)
    code = load_code([]) + (
        "model = AutoModelForCausalLM.from_pretrained('org/push-source')\n"
        "model.push_to_hub('org/pushed')\n"
        "again = AutoModelForCausalLM.from_pretrained('org/pushed')\n"
        "assert type(again.model.layers[0].mlp.up_proj).__name__ == 'AqlmLinear'\n"
        f"assert torch.equal(reference_outputs(again)['logits'], load_file({reference_path(folder)!r})['logits'])\n"
        "print('pushed ok')\n"
    )
    assert "pushed ok" in run_python(code, hub_env).stdout
    assert "model.safetensors" in {s.rfilename for s in api(hub).model_info("org/pushed").siblings}


def test_unreachable_endpoint_fails_fast(hub_env, checkpoint, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as listener:  # a port that accepts connections but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        silent = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            refused = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        for endpoint in (refused, silent):
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            started = time.monotonic()
            with pytest.raises(HubError, match=f"cannot reach the Hub at {endpoint}"):
                publish(checkpoint("aqlm"), "org/never", token=TOKEN)
            assert time.monotonic() - started < 8


def test_bad_token_is_refused_clearly(hub, hub_env, checkpoint):
    with pytest.raises(HubError, match="refused the token") as error:
        publish(checkpoint("aqlm"), "org/never", token="hf_wrong")
    assert "hf_wrong" not in str(error.value)
    assert "org/never" not in hub.state.repos


@pytest.mark.parametrize("remove", ["config.json", "model.safetensors", "tokenizer.json", RESULTS_FILE, "edit"])
def test_incomplete_folder_makes_no_request(hub, hub_env, checkpoint, tmp_path, remove):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint("aqlm"), folder)
    if remove == "edit":  # weights changed after the evaluation: the figures would not be theirs
        with open(folder / "model.safetensors", "r+b") as handle:
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
            handle.seek(-1, os.SEEK_END)
            handle.write(bytes([last[0] ^ 1]))
    else:
        os.remove(folder / remove)
    if remove == "tokenizer.json":
        os.remove(folder / "tokenizer_config.json")
    before = len(hub.state.requests)
    with pytest.raises(ValueError, match="not a complete riverone checkpoint|measured on other weights|integrity"):
        publish(str(folder), "org/never", token=TOKEN)
    assert len(hub.state.requests) == before


def test_check_checkpoint_refuses_a_dense_folder(qwen3_dir):
    with pytest.raises(ValueError, match="no riverone quantization_config.*no riverone_results.json"):
        check_checkpoint(qwen3_dir)


def test_card_of_a_mixed_vlm_checkpoint(checkpoint):
    from riverone_hf.hub import render_card

    card = render_card(checkpoint("mixed"), "org/tiny-internvl-riverone")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.tags == ["riverone", "aqlm", "minivit", "vqc", "quantized"]
    text = str(card)
    assert "AutoModelForImageTextToText.from_pretrained" in text and "--format aqlm" not in text  # not AQLM-only
    assert "**minivit**" in text and "**vqc**" in text and "**aqlm**" in text


def test_stage_settings_show_calibration_and_block_finetune_without_local_paths():
    from riverone_hf.hub.card import stage_settings

    aqlm = {"calibration": {"num_samples": 16, "seq_len": 512, "text_files": ["/home/me/data/pride.txt"]},
            "block_finetune": {"enabled": True, "lr": 1e-4, "train": ["codebooks", "scales"]},
            "true_sequential": True, "beam_size": 4, "offload_dir": None, "overrides": []}
    settings = stage_settings({"aqlm": aqlm, "minivit": None, "vqc": {"n_wires": 8}})
    assert settings == {
        "aqlm": "calibrated on 16 windows x 512 tokens of pride.txt; `beam_size=4`, "
                "`block_finetune=(enabled=True, lr=0.0001, train=[codebooks, scales])`, `true_sequential=True`",
        "vqc": "`n_wires=8`"}


def test_private_repo_needs_the_token(hub, hub_env, checkpoint):
    from huggingface_hub.errors import RepositoryNotFoundError

    publish(checkpoint("aqlm"), "org/private-one", token=TOKEN, private=True)
    assert hub.state.repos["org/private-one"].private
    assert api(hub).model_info("org/private-one").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("org/private-one")
