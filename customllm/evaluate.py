"""What `customllm-mlx eval` and `customllm-torch eval` share: their flags, the held-out
batches, and the report (tokens, mean loss, perplexity, MaxVio; no framework here)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from customllm.corpus import BUILTIN
from customllm.data import eval_batches
from customllm.metrics import max_vio


def eval_options(command: Callable) -> Callable:
    options = [
        click.option(
            "--model", "model_dir", required=True, type=click.Path(), help="Model folder."
        ),
        click.option(
            "--data",
            required=True,
            help="Text to evaluate on: a .txt/.jsonl/.parquet path or folder, or a hub dataset "
            "name[:config] (with --max-batches), all of it read in order; or builtin: the "
            "built-in stories' held-out split.",
        ),
        click.option(
            "--text-column",
            default="text",
            show_default=True,
            help="Field holding the text in .jsonl/.parquet/hub rows.",
        ),
        click.option(
            "--seq-len",
            default=None,
            type=click.IntRange(min=1),
            help="Tokens per sequence (each block holds seq_len + 1). Default: 256, or the "
            "model's context if shorter.",
        ),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1)),
        click.option(
            "--max-batches",
            default=None,
            type=click.IntRange(min=1),
            help="Stop after this many batches (default: the whole text).",
        ),
        click.option(
            "--json",
            "json_path",
            default=None,
            type=click.Path(dir_okay=False),
            help="Also write the results to this JSON file.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def heldout_batches(model_dir: str, tokenizer: Any, config: Any, options: dict) -> list[np.ndarray]:
    """The batches of `--data` for `eval` of the model folder `model_dir` (its tokenizer and
    ModelConfig), or a click error naming the option or file at fault."""
    if tokenizer is None:
        raise click.ClickException(f"{model_dir} has no tokenizer files to read --data with")
    max_positions = config.max_position_embeddings  # the vocabulary: checked at load
    if options["seq_len"] is None:
        options["seq_len"] = min(256, max_positions - 1)
    if options["seq_len"] + 1 > max_positions:
        raise click.BadParameter(
            f"{options['seq_len']} + 1 tokens exceed the model's context of {max_positions} "
            f"(max_position_embeddings of {model_dir}); pass a smaller --seq-len",
            param_hint="--seq-len",
        )
    try:
        builtin = options["data"] == BUILTIN  # its held-out split: a text training never saw
        batches = eval_batches(
            None if builtin else options["data"],
            options["data"] if builtin else None,
            tokenizer,
            options["seq_len"],
            options["batch_size"],
            max_batches=options["max_batches"],
            text_column=options["text_column"],
        )
    except (OSError, ValueError, KeyError) as err:
        raise click.ClickException(f"--data {options['data']}: {err}") from err
    if not batches:
        raise click.ClickException(
            f"--data {options['data']} holds fewer than {options['seq_len'] + 1} tokens: "
            "nothing to evaluate (pass a smaller --seq-len or more text)"
        )
    return batches


def report(
    model_dir: str, batches: list[np.ndarray], loss: float, load: np.ndarray, options: dict
) -> dict[str, Any]:
    """Print the result line and write `--json`; returns the result."""
    tokens = int(sum(b.shape[0] * (b.shape[1] - 1) for b in batches))
    vio = max_vio(np.asarray(load)) if np.asarray(load).size else None
    result = {
        "model": str(model_dir),
        "data": options["data"],
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "max_vio": None if vio is None else vio[0],
        "max_vio_mean": None if vio is None else vio[1],
        "max_vio_layer": None if vio is None else vio[2],
    }
    line = (
        f"{tokens:,} tokens | loss {loss:.4f} | perplexity {result['perplexity']:.2f} | max_vio "
        + ("n/a (dense)" if vio is None else f"{vio[0]:.3f} (layer {vio[2]}), mean {vio[1]:.3f}")
    )
    click.echo(line)
    if options["json_path"]:
        path = Path(options["json_path"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as err:
            raise click.ClickException(f"--json {path}: cannot write it ({err})") from err
    return result
