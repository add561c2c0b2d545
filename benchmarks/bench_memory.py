"""Peak memory of one training step (forward + backward) with and without gradient checkpointing.

Builds the preset's model in MLX (float32, random weights), takes the value and gradient of the
training loss on one batch of random tokens, and reports MLX's peak memory with each layer
recomputed in the backward pass (`--gradient-checkpointing`) and without. The weights and their
gradients are counted in both; the difference is the activations checkpointing saves.

    python benchmarks/bench_memory.py --preset 973m --batch-size 1 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common  # noqa: E402, F401  (sets up MLX's CPU BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402

GIB = 2**30


def peak_of_step(model: CustomLLM, tokens: mx.array, checkpoint: bool) -> tuple[float, float]:
    """(peak GiB, seconds) of one value_and_grad of the training loss."""
    model.checkpoint_layers = checkpoint

    def loss_fn(m):
        lm, aux, _ = m.training_loss(tokens[:, :-1], tokens[:, 1:])
        return lm + aux

    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() / GIB
    del grads
    return peak, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="973m")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    opts = p.parse_args()
    config = ModelConfig.from_preset(opts.preset)
    mx.random.seed(0)
    model = CustomLLM(config)
    model.train()
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / GIB
    shape = (opts.batch_size, opts.seq_len + 1)
    tokens = mx.random.randint(0, config.vocab_size, shape)
    rows = {}
    for checkpoint in (False, True):
        rows[checkpoint] = peak_of_step(model, tokens, checkpoint)
    print(f"{opts.preset}: {config.num_parameters():,} parameters ({weights:.2f} GiB float32), "
          f"batch {opts.batch_size} x {opts.seq_len}, MLX on {mx.default_device()}")  # fmt: skip
    print("| gradient checkpointing | peak memory | step time |")
    print("|---|---|---|")
    for checkpoint, (peak, seconds) in rows.items():
        print(f"| {'on' if checkpoint else 'off'} | {peak:.2f} GiB | {seconds:.1f} s |")
    saved = rows[False][0] - rows[True][0]
    print(f"saved by checkpointing: {saved:.2f} GiB "
          f"({saved / max(rows[False][0] - 2 * weights, 1e-9):.0%} of the activations)")  # fmt: skip


if __name__ == "__main__":
    main()
