"""What `customllm-mlx init` and `customllm-torch init` share: their flags and the checks that
turn them into a model config and a tokenizer (no framework here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from customllm.checkpoint import check_replaceable
from customllm.config import PRESETS, ModelConfig
from customllm.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def init_options(command: Callable) -> Callable:
    options = [
        click.option("--preset", type=str, help=f"One of: {', '.join(PRESETS)}."),
        click.option(
            "--config", "config_file", type=click.Path(dir_okay=False), help="A config.json."
        ),
        click.option(
            "--out", required=True, type=click.Path(file_okay=False), help="Folder to write."
        ),
        click.option(
            "--tokenizer",
            default=None,
            help=f"Tokenizer folder or hub name (tiny/small presets take its vocabulary size). "
            f"Default: {DEFAULT_TOKENIZER}; when the hub cannot be reached, the folder is "
            "written without tokenizer files.",
        ),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option(
            "--dtype",
            type=click.Choice(WEIGHT_DTYPES),
            default="float32",
            show_default=True,
            help="Storage dtype of the weights.",
        ),
        click.option("--force", is_flag=True, help="Replace --out if it already holds files."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def prepare_init(
    preset: str | None, config_file: str | None, out: str, tokenizer: str | None, force: bool
) -> tuple[ModelConfig, Any, Path]:
    """The config (with the tokenizer's vocabulary and EOS/BOS ids), the tokenizer (None when
    the default one cannot be loaded) and the output folder of an `init` command; click errors
    for bad input."""
    from customllm.runs import TrainingError
    from customllm.training import TrainConfig, check_model_fits, new_model_config

    if (preset is None) == (config_file is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    out_dir = Path(out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise click.ClickException(f"{out_dir} already holds files; pass --force to replace it")
    try:
        check_replaceable(out_dir)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    try:  # the config's own errors first: no tokenizer is loaded for a bad preset or file
        config = ModelConfig.from_preset(preset) if preset else ModelConfig.from_json(config_file)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    try:
        tok = load_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    except Exception as err:
        if tokenizer is None:  # the default only: say so and write the weights without it
            click.echo(
                f"warning: no tokenizer files written ({err}); pass --tokenizer PATH", err=True
            )
            return config, None, out_dir
        raise click.ClickException(f"cannot load tokenizer {tokenizer!r}: {err}") from err
    tokenizer = tokenizer or DEFAULT_TOKENIZER
    try:
        config = new_model_config(TrainConfig(preset=preset, config=config_file), tok)
        check_model_fits(config, tok, 1)
    except TrainingError as err:
        raise click.ClickException(f"{err} (tokenizer {tokenizer!r})") from err
    return config, tok, out_dir


def export_command(framework: str, load: Callable) -> click.Command:
    """`export` for one framework's CLI; `load(folder)` checks that the model opens there."""

    @click.command("export")
    @click.option(
        "--model",
        "model_dir",
        required=True,
        type=click.Path(file_okay=False, exists=True),
        help="A model folder or checkpoint.",
    )
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder.")
    @click.option("--force", is_flag=True, help="Replace --out if it holds a model folder.")
    def export(model_dir: str, out: str, force: bool) -> None:
        """A hub-ready folder: the model without optimizer or training state, a model card,
        generation_config.json and the modeling code transformers runs with
        trust_remote_code=True where this package is not installed."""
        from customllm.checkpoint import check_not_source
        from customllm.export import export_folder

        if Path(out).exists() and any(Path(out).iterdir()) and not force:
            raise click.UsageError(
                f"--out {out} exists and is not empty; add --force to replace it"
            )
        try:
            check_not_source(out, model_dir)
            check_replaceable(out)
            load(model_dir)  # the weights open and hold no NaN; the tokenizer fits
            export_folder(model_dir, out, framework)
        except (OSError, ValueError) as err:
            raise click.ClickException(str(err)) from err
        click.echo(f"wrote {out}: upload it with `hf upload NAME {out}`")

    return export
