"""Configs go to JSON in every artefact and come back from it."""
from __future__ import annotations

from dataclasses import asdict, fields


class ConfigDict:
    """Mixin for config dataclasses: `to_dict`, and `from_dict` that ignores unknown keys
    (so an artefact written by a newer version with extra fields still loads)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
