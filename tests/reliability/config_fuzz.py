"""Hostile-input generators for `RiverOneConfig` (hypothesis strategies), shared by the fuzz tests.

Every spec field of every registered stage (and the nested calibration / override dicts) gets values of
the right type, the wrong type, and the extremes: huge and negative ints, NaN/inf, bytes, deep or
catastrophic regexes, nested containers. The contract checked: a config either builds and survives a JSON
round trip unchanged, or raises `ValueError` naming a field; no other exception type.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import strategies as st

from riverone_hf.config import RiverOneConfig, registered_stages
from riverone_hf.stages.aqlm import ModuleOverride
from riverone_hf.stages.calibration_data import CalibrationSpec

NASTY_PATTERNS = [
    "(", ")", "[", "a{4294967296}", "a{2,1}", "(?P<x>a)(?P<x>b)", "\\", "*", "a**", "(?<!a+)b",
    "(" * 2000 + ")" * 2000, "(?:" * 300 + "a" + ")" * 300, "(a+)+b", "x" * 10_000, ".*", r"model\.layers\.\d+\..*",
    "a{1000000}", "[a-" + "z" * 3 + "]", "\x00", "(?i)", "(?#comment)", "\\p{L}",
]

ints = st.one_of(
    st.integers(-3, 300), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 8, 16, 2**31, 2**63, 2**64, -1]),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-4, 0.5, 1.0, -0.0, 1e308, 1e-320]),
)
texts = st.one_of(st.text(max_size=20), st.sampled_from(NASTY_PATTERNS))
scalars = st.one_of(
    st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=8), st.just(float("nan")),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


def _typed(field: dataclasses.Field):
    """Values of the field's own type (from its default), so that many generated configs get deep."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(0, 20), ints)
    if isinstance(default, float):
        return st.one_of(st.floats(0, 1), floats)
    if isinstance(default, str):
        return st.one_of(st.just(default), texts)
    return st.one_of(st.none(), st.lists(texts, max_size=3))


def _field_values(field: dataclasses.Field):
    """Plausible values for `field` mixed with anything at all."""
    plausible = {
        "target_modules": st.one_of(texts, st.lists(texts, max_size=3)),
        "modules_to_not_convert": st.lists(texts, max_size=3),
        "groups": st.lists(st.lists(ints, max_size=3), max_size=3),
        "transforms": st.lists(st.sampled_from(["attention", "mlp", "other", 3]), max_size=3),
        "text_files": st.lists(texts, max_size=2),
        "codebook_optimizer": st.sampled_from(["cg", "adam", "sgd", 1]),
        "init": st.sampled_from(["fit", "random", "x"]),
    }.get(field.name, st.nothing())
    return st.one_of(plausible, _typed(field), _typed(field), values)


def _spec_dict(cls, nested: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}

    @st.composite
    def build(draw):
        out = {}
        for key in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=6)):
            out[key] = draw(nested[key]) if key in nested and draw(st.booleans()) else draw(_field_values(fields[key]))
        if draw(st.integers(0, 19)) == 0:
            out[draw(st.sampled_from(["no_such_field", 3, b"x"]))] = 1
        return out

    return build()


calibration = st.one_of(st.none(), _spec_dict(CalibrationSpec, {}), values)
overrides = st.lists(
    st.one_of(_spec_dict(ModuleOverride, {"pattern": texts}), values), max_size=3
)
NESTED = {"calibration": calibration, "overrides": overrides}


@st.composite
def config_kwargs(draw):
    """kwargs for `RiverOneConfig(**kwargs)`: some stages, each a (hostile) dict; sometimes junk."""
    out = {}
    for name, stage in registered_stages().items():
        if draw(st.booleans()):
            out[name] = draw(st.one_of(_spec_dict(stage.spec_class, NESTED), values)) if draw(
                st.integers(0, 9)) else draw(values)
    if draw(st.integers(0, 5)) == 0:
        out["quantization_map"] = draw(st.one_of(values, st.dictionaries(texts, values, max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        out["version"] = draw(st.one_of(ints, values))
    return out


def build_and_round_trip(kwargs: dict) -> RiverOneConfig | None:
    """Build; on success check the JSON round trip. Returns the config, or None when ValueError was raised."""
    try:
        config = RiverOneConfig(**kwargs)
    except ValueError as err:
        assert str(err), "ValueError without a message"
        return None
    text = json.dumps(config.to_dict(), allow_nan=False)  # strict JSON: NaN/inf/bytes would raise here
    again = RiverOneConfig.from_dict(json.loads(text))
    assert again.to_dict() == config.to_dict()
    return config


def plan_on_meta(config: RiverOneConfig, model) -> None:
    """Plan the AQLM stage of a config that built on a meta skeleton: success or ValueError, nothing else."""
    from riverone_hf.stages.aqlm import plan_modules

    if config.aqlm is None:
        return
    try:
        plan_modules(model, config.aqlm)
    except ValueError as err:
        assert str(err)
