"""Convert a PyTorch model folder (or a Trainer `checkpoint-N/`) into one `customllm_mlx.load` opens.

    python convert/torch_to_mlx.py --src runs/torch/checkpoint-1000 --dst models/mlx [--dtype bfloat16]

The folder format is canonical, so the mapping is `customllm.convert.convert_folder`; this
script adds the check that the result opens in MLX and, with --verify, a logits comparison
(torch on --src against MLX on --dst).
"""

from __future__ import annotations

import shutil

import click

import customllm_mlx
from customllm.convert import DTYPES, convert_folder

customllm_mlx.setup_cpu()  # before anything imports mlx.core

VERIFY_TOKENS = 16


@click.command()
@click.option("--src", required=True, type=click.Path(file_okay=False), help="Torch model folder.")
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="Replace --dst if it exists.")
@click.option("--verify", is_flag=True, help="Compare torch(--src) and MLX(--dst) logits.")
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Fail --verify above this max abs diff "
    "(default 1e-3 for float32; reduced dtypes only report).",
)
def main(src: str, dst: str, dtype: str, force: bool, verify: bool, atol: float | None) -> None:
    """Convert --src into --dst and check that customllm_mlx.load opens it."""
    try:
        convert_folder(src, dst, dtype=dtype, overwrite=force)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    try:
        model, _ = customllm_mlx.load(dst, dtype="float32" if verify else None)
    except Exception as err:
        shutil.rmtree(dst, ignore_errors=True)  # a folder that does not open is no result
        raise click.ClickException(
            f"{dst} was written but customllm_mlx.load fails, so it was removed: {err}"
        ) from err
    click.echo(f"wrote {dst} ({dtype}); it opens with customllm_mlx.load")
    if verify:
        diff = max_logits_diff(src, model)
        click.echo(f"verify: max |logits torch(src) - logits mlx(dst)| = {diff:.3g}")
        limit = atol if atol is not None else (1e-3 if dtype == "float32" else None)
        if limit is not None and not diff <= limit:
            raise click.ClickException(f"logits differ by {diff:.3g} > {limit:g}")


def max_logits_diff(src: str, mlx_model) -> float:
    """Logits of the torch model on `src` and of `mlx_model` on the same tokens, float32."""
    import mlx.core as mx
    import numpy as np
    import torch

    import customllm_torch

    torch_model, _ = customllm_torch.load(src, dtype=torch.float32)
    config = torch_model.model_config
    length = min(VERIFY_TOKENS, config.max_position_embeddings)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, length))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.float().numpy()
    got = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    return float(np.abs(got - expected).max())


if __name__ == "__main__":
    main()
