"""Training metrics shared by both trainers: the per-step console line and progress bar,
`OUT/metrics.jsonl`, expert-load balance (MaxVio), and the loss-curve plot (no framework here)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from customllm.runs import TrainingError

METRICS_NAME = "metrics.jsonl"
TRAIN_RECORD_KEYS = (
    "step",
    "loss",
    "grad_norm",
    "learning_rate",
    "tokens_per_sec",
    "peak_memory_gb",
    "max_vio",
    "max_vio_mean",
    "max_vio_layer",
)
EVAL_RECORD_KEYS = ("step", "eval_loss", "eval_ppl", "eval_max_vio")
COLLAPSE_RATIO, COLLAPSE_STEPS = 3.0, 5  # warn when a layer stays this far off for this long


def layer_max_vio(load: Sequence[Sequence[float]]) -> list[float]:
    """MaxVio of each layer, max load / mean load over its experts - 1 (0: perfect balance),
    from a (layers, experts) array of assignment counts; a layer with no assignments: 0."""
    vios = []
    for row in load:
        row = [float(x) for x in row]
        mean = sum(row) / len(row) if len(row) else 0.0
        vios.append(max(row) / mean - 1 if mean > 0 else 0.0)
    return vios


def max_vio(load: Sequence[Sequence[float]]) -> tuple[float, float, int] | None:
    """(MaxVio of the worst layer, the mean over layers, the worst layer's index) of a
    (layers, experts) load; None for a model without routed experts."""
    vios = layer_max_vio(load)
    if not vios or not len(load[0]):
        return None
    worst = max(range(len(vios)), key=vios.__getitem__)
    return vios[worst], sum(vios) / len(vios), worst


class MetricsLogger:
    """One console line per logged step (a progress bar under it on a TTY) and every record
    appended to `OUT/metrics.jsonl`: train records with TRAIN_RECORD_KEYS, eval records with
    EVAL_RECORD_KEYS. `resume_step` drops records after the step a resumed run starts from."""

    def __init__(
        self,
        out: str | Path,
        total_steps: int | None = None,
        log_every: int = 1,
        stream: TextIO | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        self.path = Path(out) / METRICS_NAME
        self.total_steps, self.log_every, self.enabled = total_steps, log_every, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar_shown = False
        self._start = time.perf_counter()
        self._first_step: int | None = None
        self._collapsed: dict[int, int] = {}  # layer -> steps in a row at >= COLLAPSE_RATIO
        if enabled and resume_step is not None:
            self._drop_after(resume_step)

    def _drop_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = _record(line)  # None: a line cut by a kill, or not a record
            if record is not None and record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def _append(self, record: dict[str, Any]) -> None:
        # the run folder from the first record on: a run that fails before its first step
        # (bad data) leaves no empty --out behind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(
        self,
        step: int,
        loss: float,
        grad_norm: float | None,
        learning_rate: float,
        tokens_per_sec: float,
        peak_memory_gb: float,
        expert_load: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, Any]:
        vio = max_vio(expert_load) if expert_load is not None else None
        values = (step, loss, grad_norm, learning_rate, tokens_per_sec, peak_memory_gb)
        values += vio if vio is not None else (None, None, None)
        record = {
            k: (v if v is None or k in ("step", "max_vio_layer") else float(v))
            for k, v in zip(TRAIN_RECORD_KEYS, values, strict=True)
        }
        if not self.enabled:
            return record
        self._append(record)
        if self._first_step is None:
            self._first_step = step
        if step % self.log_every == 0 or step == self.total_steps:
            total = f"/{self.total_steps}" if self.total_steps else ""
            gn = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
            line = (
                f"step {step}{total} | loss {loss:.4f} | grad_norm {gn} | lr {learning_rate:.2e} | "
                f"{tokens_per_sec:,.0f} tok/s | mem {peak_memory_gb:.2f} GB"
            )
            if vio is not None:
                line += f" | max_vio {vio[0]:.2f} (layer {vio[2]}), mean {vio[1]:.2f}"
            self.print(line)
        if expert_load is not None:
            self._warn_collapse(step, layer_max_vio(expert_load))
        self._draw_bar(step)
        return record

    def _warn_collapse(self, step: int, vios: list[float]) -> None:
        """Once per episode: a layer whose max/mean load stayed >= COLLAPSE_RATIO for
        COLLAPSE_STEPS steps in a row (most of its tokens on the same few experts)."""
        for layer, vio in enumerate(vios):
            run = self._collapsed.get(layer, 0) + 1 if vio + 1 >= COLLAPSE_RATIO else 0
            self._collapsed[layer] = run
            if run == COLLAPSE_STEPS:
                self.print(
                    f"warning: step {step}: the experts of layer {layer} have collapsed, max/mean "
                    f"load >= {COLLAPSE_RATIO:g} for {COLLAPSE_STEPS} steps (max_vio {vio:.2f}); "
                    "see docs/architecture.md, Balancing"
                )

    def log_eval(
        self, step: int, eval_loss: float, load: Sequence[Sequence[float]] | None = None
    ) -> dict[str, Any]:
        """An eval record; `load`: the expert loads summed over the whole held-out set."""
        ppl = math.exp(eval_loss) if eval_loss < 700 else float("inf")
        vio = max_vio(load) if load is not None else None
        record = {"step": step, "eval_loss": float(eval_loss), "eval_ppl": ppl}
        record["eval_max_vio"] = None if vio is None else vio[0]
        if self.enabled:
            self._append(record)
            line = f"eval step {step} | eval_loss {eval_loss:.4f} | eval_ppl {ppl:.2f}"
            if vio is not None:
                line += f" | max_vio {vio[0]:.2f} (layer {vio[2]})"
            self.print(line)
            self._draw_bar(step)
        return record

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def _draw_bar(self, step: int) -> None:
        if not (self.tty and self.total_steps):
            return
        done = min(step, self.total_steps) / self.total_steps
        width = 30
        bar = "#" * int(done * width) + "." * (width - int(done * width))
        eta = ""
        if self._first_step is not None and step > self._first_step:
            rate = (time.perf_counter() - self._start) / (step - self._first_step + 1)
            eta = f" eta {_duration(rate * (self.total_steps - step))}"
        self.stream.write(f"\r\033[K[{bar}] {step}/{self.total_steps}{eta}")
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _record(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line's record: a JSON object with an integer "step", else None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (lines cut by a kill, or that hold no record with an
    integer "step", are skipped)."""
    return [r for r in map(_record, Path(path).read_text().splitlines()) if r is not None]


def require_matplotlib() -> None:
    """Raise TrainingError when --plot cannot work (checked before training, not after)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise TrainingError(
            "plotting needs matplotlib, an optional dependency: pip install 'customllm[plot]'"
        )


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    """Plot loss/eval_loss, learning rate, grad norm, tokens/s and MaxVio to `png`."""
    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not (train or evals):
        raise TrainingError(f"{metrics} holds no training or evaluation records to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise TrainingError(
            "plotting needs matplotlib, an optional dependency: pip install 'customllm[plot]'"
        ) from err
    panels = [
        ("loss", "loss (nats)"),
        ("learning_rate", "learning rate"),
        ("grad_norm", "grad norm"),
        ("tokens_per_sec", "tokens / s"),
        ("max_vio", "MaxVio of the worst layer (max / mean load - 1)"),
        ("peak_memory_gb", "peak memory (GB)"),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label="train", linewidth=1)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
