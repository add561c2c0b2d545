"""`customllm-mlx`: the MLX command line (init here; train and generate register below)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

import customllm_mlx  # noqa: F401  (first: preloads OpenBLAS before mlx.core is imported)
from customllm.config import PRESETS, ModelConfig
from customllm.tokenizer import DEFAULT_TOKENIZER


@click.group()
def main() -> None:
    """CustomLLM in MLX."""


@click.command()
@click.option("--preset", type=str, help=f"One of: {', '.join(PRESETS)}.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A config.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option(
    "--tokenizer",
    default=DEFAULT_TOKENIZER,
    show_default=True,
    help="Tokenizer folder or hub name; its size must equal the config's vocab_size.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the weights.",
)
@click.option("--force", is_flag=True, help="Replace --out if it already holds files.")
def init(
    preset: str | None,
    config_file: str | None,
    out: str,
    tokenizer: str,
    seed: int,
    dtype: str,
    force: bool,
) -> None:
    """Write a randomly initialised model folder (config.json, model.safetensors, tokenizer)."""
    import mlx.core as mx

    from customllm.tokenizer import load_tokenizer
    from customllm_mlx.io import save
    from customllm_mlx.model import CustomLLM

    if (preset is None) == (config_file is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    out_dir = Path(out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise click.ClickException(f"{out_dir} already holds files; pass --force to replace it")
    try:
        config = ModelConfig.from_preset(preset) if preset else ModelConfig.from_json(config_file)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err

    try:
        tok = load_tokenizer(tokenizer)
    except Exception as err:
        raise click.ClickException(f"cannot load tokenizer {tokenizer!r}: {err}") from err
    if len(tok) != config.vocab_size:
        raise click.ClickException(
            f"tokenizer {tokenizer!r} has {len(tok)} tokens but the config's vocab_size is "
            f"{config.vocab_size}; use a matching tokenizer or set vocab_size in the config"
        )
    ids = {
        name: getattr(tok, name)
        for name in ("eos_token_id", "bos_token_id")
        if getattr(tok, name, None) is not None
    }
    config = dataclasses.replace(config, **ids)

    mx.random.seed(seed)
    model = CustomLLM(config)
    save(model, out_dir, tokenizer=tok, dtype=dtype)
    click.echo(
        f"wrote {out_dir}: {config.num_parameters() / 1e6:.2f}M parameters, "
        f"vocab {config.vocab_size}, seed {seed}, {dtype}"
    )


# ---------------------------------------------------------------------------------------------
# Commands of the `customllm-mlx` group. Define a command in its own module and add it here,
# e.g. `from customllm_mlx.train import train` then `main.add_command(train)`.
# ---------------------------------------------------------------------------------------------
main.add_command(init)
from customllm_mlx.generate import generate_command  # noqa: E402

main.add_command(generate_command)
from customllm_mlx.train import train_command  # noqa: E402

main.add_command(train_command)


if __name__ == "__main__":
    main()
