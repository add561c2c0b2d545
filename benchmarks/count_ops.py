"""The aten ops one torch training step dispatches, per decoder layer: ours with grouped GEMMs
(CUDA's layout), ours with the per-expert loop (the CPU's), and transformers' DeepSeek-V3.

Where a step is bound by launches, not FLOPs (973m at batch 8 x 256 on an H200: 1.6-2.3% MFU),
the ops that launch a kernel set its time, and they can be counted on any CPU. A
`TorchDispatchMode` sees every op below autograd: forward, backward and the AdamW step under
bfloat16 autocast, as `customllm-torch train --dtype bfloat16`. "kernel ops" leaves out
views and host-side reads (`t`, `view`, `select`, `.item()`, ...); "all ops" counts them too.
The default model is the 973m structure (30 layers, 7 routed experts, top-2) at small widths.

    python benchmarks/count_ops.py
    python benchmarks/count_ops.py --hidden 768 --intermediate 1536 --latent 192   # 973m widths
    python benchmarks/count_ops.py --by-op 20   # and the 20 kernel ops whose counts differ most
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402
from customllm_torch.model import CustomLLM  # noqa: E402

NO_KERNEL = {  # views, allocations and host reads: no kernel of their own on a GPU
    "t", "view", "_unsafe_view", "reshape", "_reshape_alias", "detach", "alias", "select",
    "slice", "expand", "transpose", "permute", "unsqueeze", "squeeze", "as_strided", "split",
    "split_with_sizes", "chunk", "unbind", "empty", "empty_like", "new_empty",
    "lift_fresh", "_local_scalar_dense",
}  # fmt: skip


GROUPED, PEER = "customllm (grouped GEMMs)", "hf DeepseekV3"


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model, ids: torch.Tensor, ours: bool) -> collections.Counter:
    """The ops of the second training step (the first sets up AdamW's state)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ours:
            model.update_expert_bias(out.routing)

    step()
    counter = OpCounter()
    with counter:
        step()
    return counter.ops


def measure(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, dict[str, float]]:
    ids = torch.randint(
        0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)
    )
    rows = {}
    for name, grouped in ((GROUPED, True), ("customllm (loop)", False)):
        torch.manual_seed(0)
        model = CustomLLM(cfg)
        for layer in model.decoder_layers:
            layer.mlp.grouped = grouped
        rows[name] = step_ops(model, ids, ours=True)
    torch.manual_seed(0)
    rows[PEER] = step_ops(bc.build_torch_peer(cfg), ids, ours=False)
    layers = cfg.num_hidden_layers
    return {
        name: {
            "kernel_ops_per_layer": sum(n for op, n in ops.items() if op not in NO_KERNEL) / layers,
            "all_ops_per_layer": sum(ops.values()) / layers,
            "mm_per_layer": (ops["mm"] + ops["_grouped_mm"]) / layers,
            "kernel_ops": {op: n / layers for op, n in ops.items() if op not in NO_KERNEL},
        }
        for name, ops in rows.items()
    }


def by_op_table(rows: dict, top: int) -> str:
    """The `top` kernel ops whose per-layer counts differ most between ours (grouped) and the
    peer: where the launches go."""
    ours, peer = rows[GROUPED]["kernel_ops"], rows[PEER]["kernel_ops"]
    ops = sorted(set(ours) | set(peer), key=lambda op: -abs(ours.get(op, 0) - peer.get(op, 0)))
    return bc.markdown_table(
        ["aten op", "ours (grouped) / layer", "transformers / layer", "difference"],
        [
            [op, f"{ours.get(op, 0):.2f}", f"{peer.get(op, 0):.2f}",
             f"{ours.get(op, 0) - peer.get(op, 0):+.2f}"]
            for op in ops[:top]
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--latent", type=int, default=48, help="q and kv latent widths")
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--by-op", type=int, default=0, metavar="N", help="also the N ops that differ most"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not hasattr(torch.nn.functional, "grouped_mm"):
        raise SystemExit("count_ops.py needs torch.nn.functional.grouped_mm (torch >= 2.10)")
    cfg = dataclasses.replace(
        ModelConfig.from_preset("973m"),
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        q_latent_dim=args.latent,
        kv_latent_dim=args.latent,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab_size,
        **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")),  # derived
    )
    rows = measure(cfg, args.batch, args.seq_len)
    table = bc.markdown_table(
        ["system", "kernel ops / layer", "all ops / layer", "matmuls / layer"],
        [
            [name, f"{r['kernel_ops_per_layer']:.0f}", f"{r['all_ops_per_layer']:.0f}",
             f"{r['mm_per_layer']:.0f}"]
            for name, r in rows.items()
        ],
    )  # fmt: skip
    print(
        f"\n## aten ops of one bfloat16-autocast training step (forward, backward, AdamW), "
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq_len}\n"
    )
    print(table)
    if args.by_op:
        print(f"\n## the {args.by_op} kernel ops whose counts per layer differ most\n")
        print(by_op_table(rows, args.by_op))
    result = {"args": vars(args), "rows": rows}
    bc.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
