"""Field validators shared by every spec: each raises `ValueError` naming the field, the bad value and
what is allowed. A leaf module (standard library only), so the pure AQ engine can use it too."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
from typing import Any


def require(condition: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `condition` holds."""
    if not condition:
        raise ValueError(message)


def require_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """`value` is an int (not a bool) in [low, high] (no upper bound when `high` is None)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high),
        f"`{name}` must be an integer {allowed}, got {value!r}",
    )


def require_number(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False,
                   high_open: bool = True) -> None:
    """`value` is a real number (not a bool) within the given bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an int beyond the float range
            ok = False
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    require(ok, f"`{name}` must be a number in {left}{low}, {'inf' if high is None else high}{right}, got {value!r}")


def require_bool(name: str, value: Any) -> None:
    require(isinstance(value, bool), f"`{name}` must be true or false, got {value!r}")


MAX_REGEX_LENGTH = 2_000
MAX_REGEX_NESTING = 50


def require_str(name: str, value: Any, *, allow_empty: bool = True) -> None:
    """`value` is a `str` (not bytes) that encodes as UTF-8 (no lone surrogates) and has no NUL character."""
    ok = isinstance(value, str) and (allow_empty or value != "") and "\x00" not in value
    if ok:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    require(ok, f"`{name}` must be a{'' if allow_empty else ' non-empty'} UTF-8 string without NUL characters, "
                f"got {value!r:.200}")


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> re.Pattern:
    """`re.compile(pattern)`, cached, for patterns that passed `require_regex`."""
    return re.compile(pattern)


def _nesting(pattern: str) -> int:
    depth = deepest = 0
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(depth - 1, 0)
    return deepest


def require_regex(name: str, pattern: Any) -> None:
    """`pattern` is a string of at most `MAX_REGEX_LENGTH` characters and `MAX_REGEX_NESTING` nested groups that
    compiles as a regular expression (compiled once, cached: see `compile_regex`)."""
    require_str(name, pattern)
    require(len(pattern) <= MAX_REGEX_LENGTH,
            f"`{name}` is a regular expression of {len(pattern)} characters; at most {MAX_REGEX_LENGTH} are allowed")
    require(_nesting(pattern) <= MAX_REGEX_NESTING,
            f"`{name}` nests groups {_nesting(pattern)} deep; at most {MAX_REGEX_NESTING} are allowed: {pattern!r:.80}")
    try:
        compile_regex(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as err:
        raise ValueError(f"`{name}` is not a valid regular expression: {pattern!r:.200} ({err})") from None


def require_choice(name: str, value: Any, choices: type[enum.Enum]) -> enum.Enum:
    """`value` (a member or its string value) belongs to the str Enum `choices`; returns the member."""
    try:
        return choices(value)
    except (ValueError, TypeError):
        raise ValueError(f"`{name}` must be one of {[c.value for c in choices]}, got {value!r}") from None


def spec_from_dict(cls, data: Any, where: str):
    """Build the dataclass `cls` from a plain dict, naming unknown keys instead of a bare TypeError."""
    if isinstance(data, cls):
        return data
    require(isinstance(data, dict), f"`{where}` must be a dict or {cls.__name__}, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    require(all(isinstance(k, str) for k in data), f"`{where}` keys must be field names (strings), got {list(data)!r:.200}")
    unknown = sorted(str(k) for k in set(data) - known)
    require(not unknown, f"`{where}` has unknown field(s) {unknown}; allowed: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    require(not missing, f"`{where}` lacks required field(s) {missing}")
    return cls(**data)


def spec_to_dict(spec) -> dict[str, Any]:
    """`dataclasses.asdict` with str Enum members written as their values (so the result is plain JSON)."""
    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(spec))
