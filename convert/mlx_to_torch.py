"""Convert an MLX model folder into one `AutoModelForCausalLM.from_pretrained` opens.

    python convert/mlx_to_torch.py --src models/mlx --dst models/torch [--dtype bfloat16]

The folder format is canonical, so the mapping is `customllm.convert.convert_folder`; this
script adds the check that the result opens with transformers (after `import customllm_torch`
registers the model) with every tensor loaded and, with --verify, a logits comparison (MLX on
--src against torch on --dst).
"""

from __future__ import annotations

import shutil

import click

import customllm_mlx
from customllm.convert import DTYPES, convert_folder
from customllm.tokenizer import load_folder_tokenizer

customllm_mlx.setup_cpu()  # before anything imports mlx.core

VERIFY_TOKENS = 16


@click.command()
@click.option("--src", required=True, type=click.Path(file_okay=False), help="MLX model folder.")
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="Replace --dst if it exists.")
@click.option("--verify", is_flag=True, help="Compare MLX(--src) and torch(--dst) logits.")
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Fail --verify above this max abs diff "
    "(default 1e-3 for float32; reduced dtypes only report).",
)
def main(src: str, dst: str, dtype: str, force: bool, verify: bool, atol: float | None) -> None:
    """Convert --src into --dst and check that transformers opens it."""
    try:
        convert_folder(src, dst, dtype=dtype, overwrite=force)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    try:
        model = open_with_transformers(dst)
        load_folder_tokenizer(dst)  # a damaged tokenizer.json copied from --src fails here
    except Exception as err:
        shutil.rmtree(dst, ignore_errors=True)  # a folder that does not open is no result
        raise click.ClickException(
            f"{dst} was written but does not open, so it was removed: {err}"
        ) from err
    click.echo(f"wrote {dst} ({dtype}); it opens with AutoModelForCausalLM.from_pretrained")
    if verify:
        diff = max_logits_diff(src, model)
        click.echo(f"verify: max |logits mlx(src) - logits torch(dst)| = {diff:.3g}")
        limit = atol if atol is not None else (1e-3 if dtype == "float32" else None)
        if limit is not None and not diff <= limit:
            raise click.ClickException(f"logits differ by {diff:.3g} > {limit:g}")


def open_with_transformers(folder: str):
    """`AutoModelForCausalLM.from_pretrained(folder)` in float32; every tensor must load."""
    import torch
    from transformers import AutoModelForCausalLM

    import customllm_torch  # noqa: F401  (registers CustomLLM with the Auto classes)

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} or (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise ValueError(f"transformers did not load every tensor: {problems}")
    return model.eval()


def max_logits_diff(src: str, torch_model) -> float:
    """Logits of the MLX model on `src` and of `torch_model` on the same tokens, float32."""
    import mlx.core as mx
    import numpy as np
    import torch

    mlx_model, _ = customllm_mlx.load(src, dtype="float32")
    config = mlx_model.model_config
    length = min(VERIFY_TOKENS, config.max_position_embeddings)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, length))
    expected = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(ids)).logits.float().numpy()
    return float(np.abs(got - expected).max())


if __name__ == "__main__":
    main()
