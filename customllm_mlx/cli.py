"""`customllm-mlx`: the MLX command line (init here; train and generate register below)."""

from __future__ import annotations

import click

import customllm_mlx
from customllm.cli import export_command, init_options, prepare_init

customllm_mlx.setup_cpu()  # before the commands below import mlx.core


@click.group()
def main() -> None:
    """CustomLLM in MLX."""


@click.command()
@init_options
def init(preset, config_file, out, tokenizer, seed, dtype, force) -> None:
    """Write a randomly initialised model folder (config.json, model.safetensors, tokenizer)."""
    import mlx.core as mx

    from customllm_mlx.io import save
    from customllm_mlx.model import CustomLLM

    config, tok, out_dir = prepare_init(preset, config_file, out, tokenizer, force)
    mx.random.seed(seed)
    save(CustomLLM(config), out_dir, tokenizer=tok, dtype=dtype)
    click.echo(
        f"wrote {out_dir}: {config.num_parameters() / 1e6:.2f}M parameters, "
        f"vocab {config.vocab_size}, seed {seed}, {dtype}"
    )


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="Of the scales and of what stays unquantized (norms, routers, biases).",
)
def quantize(model_dir, out, bits, group_size, dtype) -> None:
    """Quantize a model folder (every matrix but the routers, routed experts included) into a
    folder that this package and mlx_lm load."""
    from pathlib import Path

    from mlx.utils import tree_flatten

    from customllm_mlx.io import load, quantize, save_quantized

    if Path(out).exists() and any(Path(out).iterdir()):
        raise click.UsageError(f"--out {out} exists and is not empty; choose a new folder")
    try:
        model, _ = load(model_dir, dtype=dtype)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    settings = {"group_size": int(group_size), "bits": int(bits), "mode": "affine"}
    quantize(model, settings)
    save_quantized(model, out, settings, tokenizer=model_dir)
    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters())) * 8
    per_weight = stored / model.model_config.num_parameters()
    click.echo(f"wrote {out}: {bits}-bit, groups of {group_size}, {per_weight:.2f} bits per weight")


# ---------------------------------------------------------------------------------------------
# Commands of the `customllm-mlx` group. Define a command in its own module and add it here,
# e.g. `from customllm_mlx.train import train` then `main.add_command(train)`.
# ---------------------------------------------------------------------------------------------
main.add_command(init)
main.add_command(quantize)
from customllm_mlx.generate import generate_command  # noqa: E402

main.add_command(generate_command)
from customllm_mlx.train import eval_command, train_command  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)

from customllm_mlx.io import load  # noqa: E402

main.add_command(export_command("mlx", load))


if __name__ == "__main__":  # python -m customllm_mlx.cli (sets up the CPU first)
    main()
