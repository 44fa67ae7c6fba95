"""Seeded fuzz of `RiverOneConfig`: hostile configs build and round-trip through strict JSON, or raise a
`ValueError` that names a field. Any other exception type (TypeError, OverflowError, RecursionError,
re.error, ...) fails the test, also when a config that built is planned on a meta skeleton. Derandomized and bounded (a few hundred examples) for CI."""

import torch
from hypothesis import HealthCheck, given, settings
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401  (registers the stages)
from tests.reliability.config_fuzz import build_and_round_trip, config_kwargs, plan_on_meta
from tests.tiny_models import qwen3_config

with torch.device("meta"):
    META_QWEN3 = AutoModelForCausalLM.from_config(qwen3_config())

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(config_kwargs())
def test_config_builds_and_round_trips_or_raises_value_error(kwargs):
    config = build_and_round_trip(kwargs)
    if config is not None:  # and a config that builds plans on the meta skeleton, or raises ValueError
        plan_on_meta(config, META_QWEN3)
