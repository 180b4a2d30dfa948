"""Configs go to JSON in every artefact and come back from it."""
from __future__ import annotations

import re
from dataclasses import MISSING, asdict, fields

from core.errors import ConfigError

# Annotation names (as strings, under `from __future__ import annotations`) → accepted types.
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,), "list": (list,)}


def value_fits(annotation: str, value) -> bool | None:
    """Whether `value` fits a field annotation such as "int", "list[str] | None";
    None when the annotation is beyond these simple forms (then it is not checked)."""
    understood = True
    for alt in (a.strip() for a in annotation.split("|")):
        if alt == "None":
            if value is None:
                return True
            continue
        if alt in _SCALARS:
            # bool is an int in Python, but true/false is never a number or a name here
            if isinstance(value, _SCALARS[alt]) and (alt == "bool" or not isinstance(value, bool)):
                return True
            continue
        inner = re.fullmatch(r"list\[(\w+)\]", alt)
        if inner and inner.group(1) in _SCALARS:
            if isinstance(value, list) and all(value_fits(inner.group(1), item) for item in value):
                return True
            continue
        understood = False
    return False if understood else None


class ConfigDict:
    """Mixin for config dataclasses: `to_dict`, and `from_dict` that ignores unknown keys
    (so an artefact written by a newer version with extra fields still loads)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """The config from a JSON object; ConfigError naming every missing or mistyped field
        (a hand-edited or damaged file must not turn into a TypeError deep inside a run)."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected an object with the {cls.__name__} fields, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        problems = []
        for name, f in known.items():
            if name not in values:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"{name} is missing")
            elif isinstance(f.type, str) and value_fits(f.type, values[name]) is False:
                problems.append(f"{name} must be {f.type}, got {values[name]!r:.60}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values)
