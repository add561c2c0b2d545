"""Replay the expert-bias update at several rates on a trained MLX model, its router held fixed.

    python benchmarks/bias_replay.py --model runs/small/checkpoint-1000 \
        --data ../shared/data/tinystories/train.txt \
        --eval-data ../shared/data/tinystories/heldout.txt --rates 1,0.5,0.2,0.1

Records every layer's router scores on --batches consecutive batches of --data (the order
training reads a file in) and on --eval-batches of --eval-data, then, for each
`bias_update_rate` of the "solve" rule, starts from the model's own expert bias and runs the
model's `update_expert_bias` after each batch, as training does. Per rate it prints the share
of batches whose worst layer stays at max/mean load <= 1.3 (the bias is always solved on
earlier batches), their mean MaxVio (max/mean - 1), and the MaxVio over the whole held-out
set under the bias the replay ends with. With the router fixed, this
measures how well a rate balances the batch-to-batch noise of trained routing, apart from
how it follows a router that still moves (that takes training runs: balance_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import customllm_mlx

customllm_mlx.setup_cpu()

import mlx.core as mx  # noqa: E402

from customllm.data import eval_batches  # noqa: E402
from customllm.metrics import max_vio  # noqa: E402
from customllm_mlx import load  # noqa: E402
from customllm_mlx.model import balancing_bias, top_k_indices  # noqa: E402


def router_scores(model, batches: list[np.ndarray]) -> list[list[mx.array]]:
    """Per batch, per layer: the router's float32 scores (N, E)."""
    captured: list[mx.array] = []
    for layer in model.decoder_layers:
        mlp, route = layer.mlp, layer.mlp.route

        def recording(x_flat, route=route):
            out = route(x_flat)
            captured.append(out[0])
            return out

        mlp.route = recording
    scores = []
    for batch in batches:
        captured.clear()
        model(mx.array(batch[:, :-1]))
        mx.eval(captured)
        scores.append(list(captured))
    return scores


def loads(scores: mx.array, bias: mx.array, k: int) -> mx.array:
    E = scores.shape[-1]
    idx = top_k_indices(scores + bias, k)
    return (idx[..., None] == mx.arange(E)).sum(axis=(0, 1)).astype(mx.float32)


def replay(model, train: list, heldout: list, rate: float) -> dict:
    config = dataclasses.replace(model.model_config, bias_update_rate=rate)
    k, layers = config.num_experts_per_tok, model.decoder_layers
    start = [layer.mlp.expert_bias for layer in layers]
    model.model_config = config
    worst = []
    for batch in train:
        routing = []
        for scores, layer in zip(batch, layers, strict=True):
            bias = layer.mlp.expert_bias
            target = balancing_bias(scores, bias, k) * scores.shape[0]
            routing.append(mx.stack([loads(scores, bias, k), target]))
        routing = mx.stack(routing)  # (layers, 2, E), as a training step reports it
        worst.append(max_vio(np.array(routing[:, 0]))[0])
        model.update_expert_bias(routing)
    held = [
        sum(loads(batch[i], layer.mlp.expert_bias, k) for batch in heldout)
        for i, layer in enumerate(layers)
    ]
    for layer, bias in zip(layers, start, strict=True):
        layer.mlp.expert_bias = bias
    worst = np.array(worst)
    return {
        "rate": rate,
        "balanced_share": float((worst <= 0.3).mean()),
        "mean_max_vio": float(worst.mean()),
        "heldout_max_vio": max_vio(np.array(mx.stack(held)))[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="A trained MoE's model folder.")
    p.add_argument("--data", required=True, help="Its training text.")
    p.add_argument("--eval-data", required=True, help="Held-out text.")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--rates",
        default="0.5,0.2",
        help="Comma-separated values of bias_update_rate to replay (default: 0.5,0.2).",
    )
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    opts = p.parse_args()
    model, tokenizer = load(opts.model)
    if not model.model_config.n_routed_experts or model.model_config.bias_update != "solve":
        raise SystemExit(f"Error: {opts.model} is not an MoE with bias_update 'solve'")
    batch = dict(seq_len=opts.seq_len, batch_size=opts.batch_size)
    train = router_scores(
        model, eval_batches(opts.data, None, tokenizer, **batch, max_batches=opts.batches)
    )
    heldout = router_scores(
        model, eval_batches(opts.eval_data, None, tokenizer, **batch, max_batches=opts.eval_batches)
    )
    print(f"{opts.model}: {len(train)} training batches, {len(heldout)} held-out batches")
    results = []
    for rate in (float(v) for v in opts.rates.split(",")):
        results.append(r := replay(model, train, heldout, rate))
        print(
            f"rate {rate:<5g} | batches at max/mean <= 1.3: "
            f"{r['balanced_share']:.0%} | mean MaxVio {r['mean_max_vio']:.3f} | "
            f"held-out MaxVio {r['heldout_max_vio']:.3f}"
        )
    if opts.json:
        opts.json.write_text(json.dumps({"model": opts.model, "rates": results}, indent=2))


if __name__ == "__main__":
    main()
