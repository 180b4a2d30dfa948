"""Checks a job makes before it writes anything or loads weights.

A job that is refused must leave no trace and take no time: so everything that can be
known from the arguments, the file system and a model's config.json alone is checked here,
before the output folder is made and before minutes go into loading a model.
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError


def check_output_folder(out: str) -> Path:
    """`out` (the text the user gave) as an absolute path, once it is clear that the folder
    exists and is writable or can be created; UserError saying why not (empty, a file,
    under a file, no permission)."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise UserError("the output folder is empty: give a folder path with --out")
    try:
        path = Path(out).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"output folder {out}: {getattr(exc, 'strerror', None) or exc}") from None
    if not path.name:
        raise UserError(f"output folder {out} is the root of the file system; give a folder of its own")
    existing = path
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # e.g. a folder on the way that may not be entered
        raise UserError(f"cannot reach the output folder {path}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise UserError(f"output folder {path} {where}, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UserError(f"cannot write in {existing} (permission denied); choose another output folder")
    return path


def make_output_folder(path: Path) -> None:
    """Create `path` (and its parents); UserError instead of an OSError traceback."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {path}: {exc.strerror or exc}") from None


def model_skeleton(model_path: str):
    """The model built from its config alone on the meta device (shapes, no weights, a second or
    two; tied weights tied), or None for an architecture that cannot be built that way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError, TypeError):
        return None


def check_target_modules(model_path: str, target_modules: list[str] | None) -> None:
    """UserError when a name in `target_modules` matches no linear layer of the model.

    Looks at the model's skeleton (`model_skeleton`). An architecture that cannot be built
    that way is left to the real load, which reports its own error."""
    if not target_modules:
        return
    from core.qdylora.inject import find_target_modules

    skeleton = model_skeleton(model_path)
    if skeleton is None:
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in find_target_modules(skeleton, None)})
    unknown = [name for name in target_modules if name not in leaves]
    if unknown:
        raise UserError(f"target modules {', '.join(unknown)} name no linear layer of this model; "
                        f"its linear layers are named {', '.join(leaves)}")
