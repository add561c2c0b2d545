"""The run folder `--out`: its `checkpoint-STEP/` folders, their `training_state.json`, rotation,
validation and what `--resume` points at (no framework here).

A checkpoint is a canonical model folder (config.json, model.safetensors, tokenizer files) plus
`training_state.json` and the framework's optimizer files, written through
`customllm.checkpoint.atomic_folder`, so a kill leaves the last good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from customllm.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_shapes,
    strip_wrapper_prefixes,
    unstack_experts,
)
from customllm.config import ModelConfig

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"


class TrainingError(Exception):
    """A problem the user can act on (bad option, missing or corrupt checkpoint, NaN loss)."""


class CheckpointError(TrainingError):
    pass


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / f"{CHECKPOINT_PREFIX}{step}"


_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder in `out`, oldest first (temp folders of
    unfinished saves start with '.' and are never listed)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def rotate_checkpoints(out: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all) and the temp folders that
    killed saves left behind. Returns the deleted folders."""
    out = Path(out)
    removed = []
    found = list_checkpoints(out)
    if keep_last > 0:
        for _, folder in found[:-keep_last]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if out.is_dir():
        for child in out.iterdir():
            name = child.name  # ".checkpoint-N.tmp-*", and "..checkpoint-N.tmp-*.tmp-*" of io.save
            if (
                name.startswith(".")
                and CHECKPOINT_PREFIX in name
                and (".tmp-" in name or ".old-" in name)
            ):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def write_training_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write `training_state.json` (JSON: step, framework, data_state, train_config, ...)."""
    if "step" not in state:
        raise ValueError("training state needs a 'step'")
    (Path(folder) / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_training_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TRAINING_STATE_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a training checkpoint: {TRAINING_STATE_NAME} is missing"
        )
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {path.name} is not valid JSON ({err})"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {folder} is corrupt: {path.name} has no integer 'step'")
    if state["step"] < 1 or isinstance(state["step"], bool):
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {path.name} says step {state['step']!r}; a "
            "checkpoint is written after a step >= 1"
        )
    for key, kind in (("tokens_seen", int), ("world_size", int), ("data_state", list)):
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {path.name} field {key!r} is "
                f"{type(state[key]).__name__}, not {kind.__name__}"
            )
    return state


def check_checkpoint(
    folder: str | Path, required: Sequence[str] = (), framework: str | None = None
) -> dict[str, Any]:
    """Check a checkpoint folder can be resumed; returns its training state.

    Raises CheckpointError naming the folder and the missing or damaged file: config.json,
    model.safetensors (header and size), training_state.json, and `required` framework files.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint must be a folder: {folder}")
    state = read_training_state(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME, *required):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    try:  # not JSON (from_json says so), or a field of the wrong type or range
        config = ModelConfig.from_json(folder / CONFIG_NAME)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {CONFIG_NAME}: {err}") from err
    problem, shapes = _safetensors_header(folder / WEIGHTS_NAME)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {WEIGHTS_NAME} {problem}")
    try:  # the weights against config.json: the torch Trainer loads them non-strictly
        check_shapes(shapes, config, source=f"checkpoint {folder}: {WEIGHTS_NAME}")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if framework and state.get("framework", framework) != framework:
        raise CheckpointError(
            f"checkpoint {folder} was written by customllm-{state['framework']}; its optimizer state "
            f"cannot resume a {framework} run. Start from its weights with --init {folder} instead"
        )
    return state


def _safetensors_header(path: Path) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """Why a safetensors file is unreadable (truncated, bad header) or None, and the shape of
    each tensor (canonical keys, wrapper prefixes stripped, stacked experts unstacked)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return "is truncated (header runs past the end)", {}
            header = json.loads(f.read(header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in tensors.items()}
    except (
        struct.error,
        json.JSONDecodeError,
        UnicodeDecodeError,
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
    ):
        return "has a damaged header", {}
    if 8 + header_len + end != size:
        return (
            f"is truncated or padded ({size} bytes, the header describes {8 + header_len + end})",
            {},
        )
    return None, _canonical_shapes(shapes)


def _canonical_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes under canonical keys: the mapping `canonical_numpy_weights` applies to tensors,
    applied to memory-less numpy views of each shape."""
    views = {k: np.broadcast_to(np.empty((), np.int8), shape) for k, shape in shapes.items()}
    return {k: v.shape for k, v in unstack_experts(strip_wrapper_prefixes(views)).items()}


def resolve_resume(
    resume: str | os.PathLike | bool | None,
    out: str | Path,
    required: Sequence[str] = (),
    framework: str | None = None,
) -> Path | None:
    """The checkpoint folder `--resume` names, checked; None when not resuming.

    `"latest"`/`""`/`True`: the newest `checkpoint-N` in `out`. A path: that checkpoint, or the
    newest checkpoint inside a run folder. Raises CheckpointError when none is found or it is
    missing or corrupt.
    """
    if resume is None or resume is False:
        return None
    if resume is True or str(resume) in ("", "latest"):
        folder = latest_checkpoint(out)
        if folder is None:
            raise CheckpointError(f"--resume: no checkpoint-N folder in {out} to resume from")
    else:
        folder = Path(resume)
        if folder.is_dir() and not (folder / TRAINING_STATE_NAME).exists():
            inner = latest_checkpoint(folder)
            if inner is not None:
                folder = inner
    check_checkpoint(folder, required, framework)
    return folder


@contextlib.contextmanager
def checkpoint_writing(out: str | Path, step: int, needed_bytes: int) -> Iterator[None]:
    """Around the writing of checkpoint-STEP: refuse to start when the disk has less room than
    the checkpoint needs, and turn a failed write (a full disk mid-save, a permission) into a
    TrainingError that says the last good checkpoint is intact (atomic_folder leaves it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    if free < needed_bytes:
        raise TrainingError(
            f"not enough disk space for checkpoint-{step} in {out}: it needs about "
            f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free ({kept}); free some "
            "space, lower --keep-last, or choose another --out, then continue with --resume"
        )
    try:
        yield
    except TrainingError:
        raise
    except Exception as err:
        full = shutil.disk_usage(out).free < needed_bytes or "space" in str(err).lower()
        reason = "the disk is full" if full else f"{type(err).__name__}: {err}"
        raise TrainingError(
            f"cannot write checkpoint-{step} in {out}: {reason} ({kept}, unchanged); free "
            "some space or choose another --out, then continue with --resume"
        ) from err


@contextlib.contextmanager
def run_lock(out: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold `out` for this run: an exclusive lock on the folder itself (flock), so a second
    run in the same --out stops with a TrainingError instead of interleaving checkpoints and
    metrics. The kernel releases it when the process ends, however it ends: no stale lock.
    Makes `out`. Data-parallel runs take it on rank 0 only (`enabled`)."""
    if not enabled:
        yield
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nothing to hold the folder with
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise TrainingError(
                f"--out {out} is in use by another training run; wait for it to finish, or "
                "choose another --out"
            ) from err
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def removed_if_empty(out: str | Path) -> Iterator[None]:
    """Remove `out` when the run fails and leaves it an empty folder that it did not find
    (the Trainer makes its output_dir up front; a run that stops on its data wrote nothing)."""
    out = Path(out)
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def check_new_run(out: str | Path, resume: str | Path | None = None) -> None:
    """A run never writes over another run's checkpoints: a new run needs an --out without
    checkpoints, and so does a run resumed from a checkpoint outside --out (its own run
    folder, the checkpoint's parent, it may continue in)."""
    found = list_checkpoints(out)
    if resume is not None and Path(resume).resolve().parent == Path(out).resolve():
        step = read_training_state(resume)["step"]
        later = [path.name for n, path in found if n > step]
        if later:  # they would stay "latest" (for --resume, rotation, the final message)
            raise TrainingError(
                f"--resume {resume}: {out} holds later checkpoints of the run ({', '.join(later)})"
                "; continuing from an earlier one would mix two histories in one folder. Resume "
                "into a new --out, or move the later checkpoints away"
            )
        return
    if not found:
        return
    if resume is None:
        raise TrainingError(
            f"{out} already holds a run ({found[-1][1].name}); continue it with --resume, "
            "or choose another --out"
        )
    raise TrainingError(
        f"{out} already holds another run ({found[-1][1].name}); --resume {resume} continues "
        f"the run in {Path(resume).parent}: resume there (--out {Path(resume).parent}) or "
        "choose an --out without checkpoints"
    )
