"""Training metrics shared by both trainers: the per-step console line and progress bar,
`OUT/metrics.jsonl`, expert-load imbalance, and the loss-curve plot (no framework here)."""

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
    "expert_imbalance",
)
EVAL_RECORD_KEYS = ("step", "eval_loss", "eval_ppl")


def expert_imbalance(load: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(max load / mean load over experts, for the worst layer; that layer's index) from a
    (layers, experts) array of assignment counts. 1.0 is perfect balance; a layer with no
    assignments counts as balanced."""
    worst, worst_layer = 1.0, 0
    for layer, row in enumerate(load):
        row = [float(x) for x in row]
        mean = sum(row) / len(row) if len(row) else 0.0
        value = max(row) / mean if mean > 0 else 1.0
        if value > worst:
            worst, worst_layer = value, layer
    return worst, worst_layer


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
        imbalance, layer = expert_imbalance(expert_load) if expert_load is not None else (None, 0)
        values = (step, loss, grad_norm, learning_rate, tokens_per_sec, peak_memory_gb, imbalance)
        record = {
            k: (v if v is None or k == "step" else float(v))
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
            if imbalance is not None:
                line += f" | expert imbalance {imbalance:.2f} (layer {layer})"
            self.print(line)
        self._draw_bar(step)
        return record

    def log_eval(self, step: int, eval_loss: float) -> dict[str, Any]:
        ppl = math.exp(eval_loss) if eval_loss < 700 else float("inf")
        record = {"step": step, "eval_loss": float(eval_loss), "eval_ppl": ppl}
        if self.enabled:
            self._append(record)
            self.print(f"eval step {step} | eval_loss {eval_loss:.4f} | eval_ppl {ppl:.2f}")
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
    """Plot loss/eval_loss, learning rate, grad norm, tokens/s and expert imbalance to `png`."""
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
        ("expert_imbalance", "expert imbalance (max / mean)"),
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
