"""`customllm-torch`: the PyTorch command line (init here; train and generate register below)."""

from __future__ import annotations

import click
import torch

from customllm.cli import export_command, init_options, prepare_init
from customllm_torch.io import load, save
from customllm_torch.model import CustomLLM


@click.group()
def main() -> None:
    """CustomLLM, PyTorch reference."""


@click.command()
@init_options
def init(preset, config_file, out, tokenizer, seed, dtype, force) -> None:
    """Write a randomly initialised model folder (config.json, model.safetensors, tokenizer)."""
    config, tok, out_dir = prepare_init(preset, config_file, out, tokenizer, force)
    torch.manual_seed(seed)
    save(CustomLLM(config), out_dir, tokenizer=tok, dtype=getattr(torch, dtype))
    click.echo(
        f"wrote {out_dir}: {config.num_parameters() / 1e6:.2f}M parameters, "
        f"vocab {config.vocab_size}, seed {seed}, {dtype}"
    )


# ---------------------------------------------------------------------------------------------
# Commands of the `customllm-torch` group. Define a command in its own module and add it here.
# ---------------------------------------------------------------------------------------------
main.add_command(init)
from customllm_torch.generate import generate_command  # noqa: E402

main.add_command(generate_command)
from customllm_torch.train import eval_command, train_command  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)

main.add_command(export_command("torch", load))


if __name__ == "__main__":
    main()
