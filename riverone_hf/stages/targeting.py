"""Which modules a stage targets: peft-style selection of Linears (one regex string, or a list of names and
dotted suffixes), ownership by earlier stages through parent modules, tied weights."""

from __future__ import annotations

from torch import nn

from ..validation import compile_regex, require, require_regex


REGEX_CHARACTERS = set("\\[](){}*+?|^$")


def modules_matching(modules: dict[str, nn.Module], target_modules: str | list[str], field_name: str,
                     kind: str = "Linear") -> list[str]:
    """Names of `modules` selected by `target_modules`, in the model's order, by peft's convention: one string
    is a regular expression `re.fullmatch`ed on the full module name; a list names modules exactly or as a
    dotted suffix (`"down_proj"`, `"mlp.fc2"`). ValueError for a string or a list entry that selects nothing
    (`kind` names what `modules` holds in that message)."""
    if isinstance(target_modules, str):
        selected = [name for name in modules if compile_regex(target_modules).fullmatch(name)]
        if not selected:
            raise ValueError(f"`{field_name}` regular expression {target_modules!r} matches no {kind} (re.fullmatch "
                             f"on full module names); examples of names: {list(modules)[:5]}")
        return selected
    for entry in target_modules:
        if not any(_names(name, entry) for name in modules):
            hint = (" A list entry is a module name or a dotted suffix of one (peft's convention); give "
                    f"`{field_name}` as ONE string for a regular expression." if REGEX_CHARACTERS & set(entry) else "")
            raise ValueError(f"`{field_name}` entry {entry!r} names no {kind} (exact name or dotted suffix); "
                             f"examples of names: {list(modules)[:5]}.{hint}")
    return [name for name in modules if any(_names(name, entry) for entry in target_modules)]


def _names(name: str, entry: str) -> bool:
    """Whether list entry `entry` names module `name`: equal to it, or a suffix at a dot boundary."""
    return name == entry or name.endswith("." + entry)


def require_target_modules(field_name: str, value, *, allow_none: bool) -> None:
    """ValueError unless `value` is a regular expression (one string), a non-empty list of non-empty module
    names (strings), or (when allowed) None."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        require_regex(field_name, value)
        return
    require(isinstance(value, list) and value and all(isinstance(v, str) and v for v in value),
            f"`{field_name}` must be one regular expression (a string) or a non-empty list of module names or "
            f"dotted suffixes{' or None' if allow_none else ''}, got {value!r:.200}")


def is_claimed(name: str, claimed: set[str]) -> bool:
    """Whether `name` or a module above it was taken by an earlier stage."""
    return name in claimed or any(name.startswith(owner + ".") for owner in claimed)


def tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is tied to another tensor (transformers' `all_tied_weights_keys`)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {key.removesuffix(".weight") for pair in tied.items() for key in pair}
