#!/usr/bin/env python
"""Plot a training run's metrics.jsonl: loss and eval loss, learning rate, grad norm, tokens/s,
expert imbalance and peak memory.

    python scripts/plot_metrics.py runs/train/metrics.jsonl --out runs/train/metrics.png

Needs matplotlib (`pip install 'customllm[plot]'`).
"""

from __future__ import annotations

from pathlib import Path

import click

from customllm.metrics import plot_metrics
from customllm.runs import TrainingError


@click.command()
@click.argument("metrics", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", type=click.Path(dir_okay=False), help="PNG to write (default: beside METRICS)."
)
def main(metrics: str, out: str | None) -> None:
    """Plot METRICS_JSONL (a run's OUT/metrics.jsonl) to a PNG."""
    png = Path(out) if out else Path(metrics).with_suffix(".png")
    try:
        click.echo(f"wrote {plot_metrics(metrics, png)}")
    except TrainingError as err:
        raise click.ClickException(str(err)) from err


if __name__ == "__main__":
    main()
