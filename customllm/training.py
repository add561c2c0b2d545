"""Training pieces shared by `customllm-torch train` and `customllm-mlx train` (no framework here).

`TrainConfig` holds every option and `train_options` adds them to a click command, with the same
names in both CLIs. Both loops follow the same conventions, so their losses match:

- Batches: `StreamDataset.next_batch(B)` gives `ids` of shape (B, seq_len + 1);
  `inputs = ids[:, :-1]`, `targets = ids[:, 1:]`. The loss is the mean cross entropy over all
  B * seq_len predictions, computed by the model's fused lm_head + loss from the already
  shifted `targets`. Training adds the model's aux loss; expert loads count the routing of the
  seq_len input tokens.
- Gradient: the mean over `grad_accum` micro-batches of each micro-batch's mean loss, then the
  global norm is clipped to `max_grad_norm` (0: no clipping), then one AdamW update.
- Optimizer: AdamW, betas (0.9, 0.95), eps 1e-8, decoupled weight decay on the parameters for
  which `decays(name, ndim)` is true; learning rate `lr_at(update, cfg)` for update 0, 1, ...
- Expert bias: updated once per optimizer update, from loads summed over the micro-batches and the
  data-parallel ranks.
- Checkpoints: `OUT/checkpoint-STEP/` folders, see `customllm.runs`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from customllm.config import PRESETS, ModelConfig
from customllm.runs import (
    TRAINING_STATE_NAME,
    CheckpointError,
    TrainingError,
    latest_checkpoint,
)

DTYPES = ("float32", "bfloat16")
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


class NonFiniteLossError(TrainingError):
    def __init__(
        self, step: int, loss: float, last_checkpoint: Path | None = None, what: str = "loss"
    ):
        self.step, self.loss = step, loss
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"{what} is {loss} at step {step}; stopped without saving ({kept}). "
            "Try a lower --lr, a longer --warmup-steps or a lower --max-grad-norm"
        )


# Options ----------------------------------------------------------------------------------------
DEFAULT_PRESET = "small"
MODEL_OPTIONS = ("preset", "config", "init")  # where the model comes from


@dataclass
class TrainConfig:
    """Every `train` option (OPTION_HELP says what each means). Defaults: a CPU quick start."""

    preset: str | None = None  # None: DEFAULT_PRESET for a new run, the checkpoint's on resume
    config: str | None = None
    init: str | None = None
    data: str | None = None
    eval_data: str | None = None
    text_column: str = "text"
    tokenizer: str | None = None
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    shuffle_buffer: int = 0
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    steps: int = 500
    eval_every: int = 100
    eval_steps: int = 10
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    out: str = "runs/train"
    resume: str | None = None
    seed: int = 0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    sample_every: int | None = None
    prompt: str = "The"
    max_sample_tokens: int = 48
    plot: bool = False

    def __post_init__(self) -> None:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.validate()

    def validate(self) -> None:
        if self.config and self.init:
            raise TrainingError("give at most one of --config FILE and --init MODEL_DIR")
        if self.preset is not None and (self.config or self.init):
            other = "--config FILE" if self.config else "--init MODEL_DIR"
            raise TrainingError(f"give at most one of --preset NAME and {other}")
        if not (self.config or self.init) and self.model_preset not in PRESETS:
            raise TrainingError(
                f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}"
            )
        for name in ("lr", "min_lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise TrainingError(
                    f"--{name.replace('_', '-')} must be a finite number, got {value}"
                )
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every"):
            if getattr(self, name) <= 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be positive")
        if self.max_sample_tokens <= 0:
            raise TrainingError(
                "--max-sample-tokens must be positive (--sample-every 0 turns the samples off)"
            )
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_steps",
            "save_every",
            "keep_last",
            "shuffle_buffer",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must not be negative")
        if self.eval_every and not self.eval_steps:
            raise TrainingError("--eval-steps must be positive when --eval-every is")
        if self.eval_data and not self.eval_every:
            raise TrainingError(
                f"--eval-data {self.eval_data} is given but --eval-every 0 turns evaluation off"
            )
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise TrainingError(
                f"need 0 < --lr and 0 <= --min-lr <= --lr, got {self.lr}, {self.min_lr}"
            )
        if self.dtype not in DTYPES:
            raise TrainingError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.eval_data and _same_source(self.eval_data, self.train_data()):
            raise TrainingError(
                f"--eval-data is the training data ({self.train_data()}); leave it out to "
                "evaluate on the held-out split of --data, or pass other text"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from options or a saved dict; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_preset(self) -> str:
        """--preset, or DEFAULT_PRESET where it was not given."""
        return self.preset or DEFAULT_PRESET

    def train_data(self) -> str:
        """--data, else the default source for the model: built-in corpus, hub corpus for 973m."""
        return _data_source(vars(self))

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * self.seq_len * world_size


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


OPTION_HELP = {
    "preset": "Model size of a new model (default: small).",
    "config": "config.json of a new model (instead of --preset).",
    "init": "Start from the weights of this model folder (fresh optimizer).",
    "data": "builtin, a .txt/.jsonl/.parquet path or folder (one with mlx_lm's train.jsonl: "
    "trains on it, evaluates on valid.jsonl), or a hub dataset name[:config]. "
    "Default: builtin (tiny, small), the hub corpus (973m).",
    "eval_data": "Text to evaluate on. Default: the held-out split of --data.",
    "text_column": "Field holding the text in .jsonl/.parquet/hub rows.",
    "tokenizer": "Tokenizer folder, hub id or builtin. Default: the --resume/--init folder's, "
    "else builtin (938 tokens, trained once on the built-in stories) for --data builtin, "
    "else HuggingFaceTB/cosmo2-tokenizer.",
    "seq_len": "Tokens per sequence (each block holds seq_len + 1).",
    "batch_size": "Sequences per micro-batch (per device).",
    "grad_accum": "Micro-batches per optimizer step.",
    "shuffle_buffer": "Blocks held for shuffling (0: stream order).",
    "lr": "Peak learning rate.",
    "min_lr": "End of the cosine decay. Default: lr / 10.",
    "warmup_steps": "Linear warmup steps.",
    "weight_decay": "AdamW weight decay (weight matrices only).",
    "max_grad_norm": "Clip the global gradient norm (0: off).",
    "steps": "Optimizer steps in all (a resumed run continues to this total).",
    "eval_every": "Evaluate every N steps and at the end (0: never).",
    "eval_steps": "Batches per evaluation.",
    "save_every": "Checkpoint every N steps (0: only at the end).",
    "keep_last": "Checkpoints to keep (0: all).",
    "log_every": "Console line every N steps (metrics.jsonl gets every step).",
    "out": "Run folder: checkpoint-N folders and metrics.jsonl.",
    "resume": "Resume from a checkpoint folder; the flag alone: the latest in --out.",
    "seed": "Seed of the weights, the data shuffle and dropout.",
    "dtype": "bfloat16: mixed precision where the device supports it.",
    "gradient_checkpointing": "Recompute each layer's activations in the backward pass instead "
    "of keeping them: less memory for about a third more compute.",
    "sample_every": "Print a sample every N steps (default: with each evaluation; 0: never).",
    "prompt": "Prompt of the samples.",
    "max_sample_tokens": "Tokens per sample.",
    "plot": "Write OUT/metrics.png at the end (needs matplotlib).",
}
_OPTION_TYPES = {
    "preset": click.Choice(list(PRESETS)),
    "config": click.Path(dir_okay=False, exists=True),
    "init": click.Path(file_okay=False, exists=True),
    "out": click.Path(file_okay=False),
    "dtype": click.Choice(DTYPES),
    "min_lr": float,
    "sample_every": int,
}


def train_options(command: Callable) -> Callable:
    """Add one click option per TrainConfig field (`--seq-len` -> `seq_len`), same in both CLIs."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        flag, default = "--" + field.name.replace("_", "-"), field.default
        kwargs: dict[str, Any] = {"help": OPTION_HELP[field.name]}
        if field.type in (bool, "bool"):
            kwargs["is_flag"] = True
        elif field.name == "resume":
            kwargs.update(is_flag=False, flag_value="latest", default=None)
        else:
            kind = _OPTION_TYPES.get(field.name, str if default is None else type(default))
            kwargs.update(default=default, show_default=default is not None, type=kind)
        command = click.option(flag, **kwargs)(command)
    return command


# Schedule and optimizer rule --------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer update `step` (0-based): linear warmup to `lr` over the first
    `warmup_steps` updates (lr * (step + 1) / warmup), then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def decays(name: str, ndim: int) -> bool:
    """Whether weight decay applies to a parameter: every weight matrix (ndim >= 2: projections,
    experts, routers, lm_head.weight; stacked experts too) except the embedding tables. No decay
    for norm weights, lm_head.bias, or embeddings. (expert_bias is a buffer, never optimized.)"""
    return ndim >= 2 and not name.endswith(
        ("token_embeddings.weight", "position_embeddings.weight")
    )


def is_router(name: str) -> bool:
    """Whether a parameter is a router's weight (trained at `router_lr_scale` times the lr)."""
    return name.endswith("mlp.router.weight")


# Stopping ---------------------------------------------------------------------------------------
class StopSignal:
    """While entered, SIGINT/SIGTERM only set `requested`: the loop saves a checkpoint at the end
    of the current step and exits cleanly. A second SIGINT interrupts at once."""

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested = False
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.name = signal.Signals(signum).name
        print(
            f"\n{self.name} received: saving a checkpoint at the end of this step, then stopping "
            "(press Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def check_finite(loss: float, step: int, out: str | Path | None = None, what: str = "loss") -> None:
    """Raise NonFiniteLossError naming the step (and the last good checkpoint) on NaN/inf;
    call it before the optimizer update, so the weights never take a NaN step."""
    if not math.isfinite(loss):
        last = latest_checkpoint(out) if out is not None else None
        raise NonFiniteLossError(step, loss, last, what)


def check_finite_state(bad: list[str], step: int, out: str | Path) -> None:
    """Before a checkpoint is written: raise NonFiniteLossError naming the first of the `bad`
    tensors (model or optimizer state holding NaN/inf) and the last good checkpoint."""
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteLossError(step, math.nan, latest_checkpoint(out), f"tensor {bad[0]!r}{more}")


def model_source(options: dict[str, Any]) -> tuple[str, Any]:
    """Where a run's model comes from, ("config" | "init" | "preset", value), given its
    options (a saved train_config too: runs before DEFAULT_PRESET saved "small" alongside)."""
    for name in ("config", "init"):
        if options.get(name):
            return name, options[name]
    return "preset", options.get("preset") or DEFAULT_PRESET


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Options of a resumed run that differ from the checkpoint's (out/resume/plot excluded)."""
    ignore = {"out", "resume", "plot", "log_every", "sample_every", "prompt", "max_sample_tokens"}
    current = cfg.to_dict()
    return [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {current[k]!r}"
        for k in current
        if k not in ignore and k in saved and not _same_option(k, saved, current)
    ]


def _same_option(key: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether an option has the same meaning in both runs: data sources compare as the
    files or sources they name (a relative and an absolute path to one file; no --data and
    the model's default source), the rest as values."""
    a, b = saved[key], current[key]
    if key == "data":
        a, b = _data_source(saved), _data_source(current)
    if key in ("data", "eval_data", "tokenizer") and a is not None and b is not None:
        return _same_source(str(a), str(b))
    return a == b


def _data_source(options: dict[str, Any]) -> str:
    """--data, else the default source of the run's model: the built-in corpus, the hub
    corpus for the 973m preset (`TrainConfig.train_data`; a saved train_config too)."""
    if options.get("data"):
        return options["data"]
    from customllm.corpus import BUILTIN
    from customllm.data import DEFAULT_HUB_DATA

    return DEFAULT_HUB_DATA if model_source(options) == ("preset", "973m") else BUILTIN


# Options a resumed run may change: they do not alter the numbers of the steps it continues.
CHANGEABLE_ON_RESUME = (
    "steps",
    "eval_every",
    "eval_steps",
    "save_every",
    "keep_last",
    "log_every",
    "sample_every",
    "prompt",
    "max_sample_tokens",
    "plot",
    "preset",
    "config",
    "init",
    "tokenizer",
    "resume",
    "out",
)


def check_resume(
    state: dict[str, Any],
    folder: Path,
    cfg: TrainConfig,
    world_size: int,
    required: Sequence[str] = ("data_state", "train_config"),
) -> None:
    """Raise TrainingError when this run's options would not continue the checkpoint's run."""
    if state.get("world_size", 1) != world_size:
        raise TrainingError(
            f"{folder} was written by {state.get('world_size')} data-parallel ranks; "
            f"this run has {world_size}: resume with the same number"
        )
    for key in required:
        if key not in state:
            raise CheckpointError(
                f"checkpoint {folder} is incomplete: {TRAINING_STATE_NAME} has no {key!r}"
            )
    saved = state["train_config"]
    given = {name: getattr(cfg, name) for name in MODEL_OPTIONS if getattr(cfg, name) is not None}
    if given and model_source(given) != model_source(saved):
        kind, value = model_source(saved)
        raise TrainingError(
            f"--resume {folder}: the run's model is the checkpoint's (its run had --{kind} "
            f"{value!r}); --{' --'.join(f'{k} {v!r}' for k, v in given.items())} would not "
            f"change it. Leave it out, or start a new run from its weights with --init {folder}"
        )
    if not given:  # the checkpoint's, for the checkpoints this run writes
        for name in MODEL_OPTIONS:
            setattr(cfg, name, saved.get(name))
    changed = [
        line
        for line in config_differences(saved, cfg)
        if line.split()[0][2:].replace("-", "_") not in CHANGEABLE_ON_RESUME
    ]
    if changed:
        raise TrainingError(
            f"--resume {folder}: options differ from the checkpoint's run ({'; '.join(changed)}). "
            f"Resume with the same options, or start from its weights with --init {folder}"
        )


def tokenizer_source(cfg: TrainConfig, resume: Path | None) -> str:
    """--tokenizer, else the tokenizer saved in the --resume/--init folder, else the built-in
    one for the built-in corpus, else the default (cosmo2)."""
    from customllm.corpus import BUILTIN
    from customllm.tokenizer import BUILTIN_TOKENIZER, DEFAULT_TOKENIZER

    if cfg.tokenizer:
        return cfg.tokenizer
    for folder in (resume, Path(cfg.init) if cfg.init else None):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return str(folder)
    return BUILTIN_TOKENIZER if cfg.train_data() == BUILTIN else DEFAULT_TOKENIZER


def new_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The config of a new model: --config, or the preset. The small presets take the vocabulary
    of their tokenizer (973m keeps its 49,152); EOS/BOS ids come from the tokenizer."""
    from customllm.tokenizer import eos_token_id

    if cfg.config:
        config = ModelConfig.from_json(cfg.config)
    else:
        vocab = {} if cfg.model_preset == "973m" else {"vocab_size": len(tokenizer)}
        config = ModelConfig.from_preset(cfg.model_preset, **vocab)
    ids = {"eos_token_id": eos_token_id(tokenizer)}
    if getattr(tokenizer, "bos_token_id", None) is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    return dataclasses.replace(config, **ids)


def memory_bytes() -> int | None:
    """The memory a run can take: MemAvailable on Linux, the physical memory elsewhere (a Mac's
    unified memory), None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(
    config: ModelConfig, batch_size: int, seq_len: int, memory: int | None, where: str = "memory"
) -> None:
    """Refuse a micro-batch that cannot fit before the first step allocates it. The estimate is
    a lower bound, so nothing that fits is refused: 8 bytes per parameter (weights, gradients
    and AdamW's two moments at 2 bytes each) and, per token and layer, two float32 vectors of
    the hidden size kept for the backward pass (a real step keeps several times more)."""
    if memory is None:
        return
    fixed = 8 * config.num_parameters()
    per_row = seq_len * config.num_hidden_layers * config.hidden_size * 8
    needed = fixed + batch_size * per_row
    if needed <= memory:
        return
    gib = 2**30
    fits = max(0, (memory - fixed) // per_row)
    advice = (
        f"at most --batch-size {fits} fits at --seq-len {seq_len} (fewer in practice; "
        "--grad-accum keeps the tokens per step)"
        if fits
        else "the model alone does not fit; use a smaller preset"
    )
    raise TrainingError(
        f"--batch-size {batch_size} x --seq-len {seq_len} needs at least {needed / gib:,.1f} GiB, "
        f"more than the {memory / gib:,.1f} GiB of {where}: {advice}"
    )


def check_model_fits(config: ModelConfig, tokenizer, seq_len: int) -> None:
    """The tokenizer's ids and the sequence length must fit the model."""
    if len(tokenizer) > config.vocab_size:
        raise TrainingError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
            f"{config.vocab_size}"
        )
    if seq_len > config.max_position_embeddings:
        raise TrainingError(
            f"--seq-len {seq_len} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens"
        )
