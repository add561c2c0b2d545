"""`customllm-mlx`: the MLX command line (init here; train and generate register below)."""

from __future__ import annotations

import click

import customllm_mlx  # noqa: F401  (first: preloads OpenBLAS before mlx.core is imported)
from customllm.cli import init_options, prepare_init


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


# ---------------------------------------------------------------------------------------------
# Commands of the `customllm-mlx` group. Define a command in its own module and add it here,
# e.g. `from customllm_mlx.train import train` then `main.add_command(train)`.
# ---------------------------------------------------------------------------------------------
main.add_command(init)
from customllm_mlx.generate import generate_command  # noqa: E402

main.add_command(generate_command)
from customllm_mlx.train import eval_command, train_command  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)


if __name__ == "__main__":
    main()
