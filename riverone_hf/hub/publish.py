"""Publish a riverone checkpoint folder to a Hub: every check first, then ONE commit.

Order (`publish`): `check_checkpoint` (no network: config with a riverone quantization_config, safetensors
weights whose sha256 match the ones recorded in the results JSON, tokenizer files, `riverone_results.json`;
then `riverone_hf.integrity.verify_checkpoint`) -> token from the usual huggingface_hub places
(never printed) -> one short-timeout request to the endpoint (`whoami`: unreachable endpoint or refused
token fail here, in seconds) -> `create_repo(exist_ok=True)` -> branch for a non-default revision ->
card rendered into a temporary copy of the folder as README.md -> ONE `upload_folder` commit. Publishing
the same folder again uploads nothing new (the Hub skips unchanged files) and returns the same commit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from .. import integrity
from ..metrics.evaluation import RESULTS_FILE, load_results, weight_hashes

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PREFLIGHT_TIMEOUT_S = 5.0

__all__ = ["HubError", "PublishResult", "check_checkpoint", "check_hub_access", "publish"]


class HubError(RuntimeError):
    """The Hub could not be reached, refused the token, or refused the upload (the message says which)."""


@dataclass
class PublishResult:
    repo_url: str
    commit_oid: str
    commit_url: str
    revision: str


def check_checkpoint(folder: str) -> dict:
    """Raise ValueError naming everything that makes `folder` not a complete, publishable riverone checkpoint.

    Makes no network call. Returns the results JSON.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a directory")
    problems = []
    config_path = os.path.join(folder, "config.json")
    qconfig = {}
    if not os.path.isfile(config_path):
        problems.append("no config.json")
    else:
        with open(config_path, encoding="utf-8") as handle:
            qconfig = json.load(handle).get("quantization_config") or {}
        if qconfig.get("quant_method") != "riverone":
            problems.append(f"config.json has no riverone quantization_config (quant_method "
                            f"{qconfig.get('quant_method')!r})")
    names = set(os.listdir(folder))
    if not any(n.endswith(".safetensors") for n in names):
        problems.append("no *.safetensors weight file")
    if any(n.endswith(integrity.PICKLE_SUFFIXES) for n in names):
        problems.append("pickle weight files are present (only safetensors are published)")
    if not any(n in names for n in TOKENIZER_FILES):
        problems.append(f"no tokenizer files (one of {list(TOKENIZER_FILES)})")
    results = None
    if RESULTS_FILE not in names:
        problems.append(f"no {RESULTS_FILE} (run `riverone evaluate {folder} --text HELD_OUT.txt`)")
    else:
        results = load_results(folder)
        recorded = (results.get("model") or {}).get("weights_sha256")
        if recorded != weight_hashes(folder):
            problems.append(f"{RESULTS_FILE} was measured on other weights (their sha256 differ from the files "
                            "now in the folder): evaluate again")
    if problems:
        raise ValueError(f"{folder!r} is not a complete riverone checkpoint: " + "; ".join(problems))
    integrity.verify_checkpoint(folder)
    return results


def _preflight(endpoint: str, token: str) -> None:
    """One request with a short timeout: unreachable endpoint or refused token -> HubError, in seconds."""
    try:  # the HTTP client huggingface_hub uses: httpx2 (huggingface_hub >= 2), httpx before
        import httpx2 as httpx
    except ImportError:
        import httpx
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    url = f"{endpoint}/api/whoami-v2"
    try:
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=PREFLIGHT_TIMEOUT_S)
    except (httpx.ConnectError, httpx.TimeoutException) as error:
        raise HubError(f"cannot reach the Hub at {endpoint} ({type(error).__name__}: {error}); check HF_ENDPOINT "
                       "and the network") from None
    if response.status_code == 401:
        raise HubError(f"the Hub at {endpoint} refused the token (401 {response.headers.get('X-Error-Message', '')}"
                       "); log in again with `hf auth login` or set HF_TOKEN")
    if response.status_code >= 400:
        raise HubError(f"the Hub at {endpoint} answered {response.status_code} to {url}")


def check_hub_access(token: str | None = None) -> str:
    """The token (given, else from the usual huggingface_hub places) and one short request to the endpoint:
    HubError when there is no token, the endpoint is unreachable or it refuses the token. Returns the token.
    A long job that publishes at its end calls this at its start."""
    from huggingface_hub import HfApi, constants, get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (publishing needs write access)")
    _preflight(HfApi(token=token).endpoint or constants.ENDPOINT, token)
    return token


def publish(folder: str, repo_id: str, *, private: bool = False, revision: str | None = None,
            base_model: str | None = None, license: str | None = None, token: str | None = None,
            commit_message: str | None = None) -> PublishResult:
    """Check `folder`, render its card, and upload it to `repo_id` in one commit (see the module docstring)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from .card import render_card

    check_checkpoint(folder)
    token = check_hub_access(token)
    api = HfApi(token=token)
    endpoint = api.endpoint or constants.ENDPOINT
    try:
        if license is None and base_model:
            try:  # copy the base model's license when its card says it
                license = (api.model_info(base_model).card_data or {}).get("license")
            except HfHubHTTPError as error:  # an unknown license is left out, never guessed
                logger.warning("could not read the license of base model %s (%s): the card states none", base_model,
                               error)
                license = None
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        branch = revision or constants.DEFAULT_REVISION
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        card = render_card(folder, repo_id, base_model=base_model, license=license)
        with tempfile.TemporaryDirectory(prefix="riverone-publish-") as staging:
            copy = os.path.join(staging, "model")
            shutil.copytree(folder, copy)
            card.save(os.path.join(copy, "README.md"))
            name = os.path.basename(os.path.abspath(folder))
            commit = api.upload_folder(repo_id=repo_id, folder_path=copy, revision=branch,
                                       commit_message=commit_message or f"Upload riverone checkpoint {name}")
    except HfHubHTTPError as error:
        raise HubError(f"the Hub at {endpoint} refused the upload: {error}") from None
    return PublishResult(repo_url=str(repo_url), commit_oid=commit.oid, commit_url=commit.commit_url, revision=branch)
