"""lm_head + cross entropy, forward and backward: the fused `linear_cross_entropy` against the
unfused loss on full logits, in MLX and torch, at several hidden sizes.

Unfused = `cross_entropy(h @ W.T + b)` (ours in MLX, `F.cross_entropy(F.linear(...))` in torch),
fused = `linear_cross_entropy(h, W, b, labels)` at its default chunk (or --chunk-rows). Rows: ms
for value and gradients of (h, W, b), the ratio unfused / fused (> 1: fused is faster), and in
MLX the peak memory of the call (`mx.get_peak_memory`). A second table times the MLX
exponentials on one chunk of shifted logits (what the loss spends most of its time in on CPU):
`mx.exp`, `power(2, x * log2(e))` (the loss before its own `exp`) and `customllm_mlx.loss.exp`.

    python benchmarks/bench_loss.py --hidden 64,256,768 --tokens 2048 --torch-threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402  (sets up MLX's CPU BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from customllm_mlx.loss import LOG2E, cross_entropy  # noqa: E402
from customllm_mlx.loss import default_chunk_rows as mlx_chunk_rows  # noqa: E402
from customllm_mlx.loss import exp as mlx_exp  # noqa: E402
from customllm_mlx.loss import linear_cross_entropy as mlx_linear_ce  # noqa: E402
from customllm_torch.loss import default_chunk_rows as torch_chunk_rows  # noqa: E402
from customllm_torch.loss import linear_cross_entropy as torch_linear_ce  # noqa: E402

HEADERS = ["framework", "hidden", "chunk rows", "unfused ms", "fused ms", "speedup", "MLX peak"]
EXP_HEADERS = ["exponential", "ms", "ns per number", "customllm exp faster by"]
EXP_FNS = {
    "mx.exp": mx.exp,
    "mx.power(2, x * log2 e)": lambda x: mx.power(2.0, x * LOG2E),
    "customllm_mlx.loss.exp": mlx_exp,
}


def mlx_fns(h, w, b, y, chunk):
    def unfused(h, w, b):
        return cross_entropy(mx.addmm(b, h, w.T), y).mean()

    def fused(h, w, b):
        return mlx_linear_ce(h, w, b, y, chunk)

    grads = {k: mx.value_and_grad(f, argnums=(0, 1, 2)) for k, f in (("u", unfused), ("f", fused))}
    return {k: (lambda g=g: mx.eval(g(h, w, b))) for k, g in grads.items()}


def torch_fns(h, w, b, y, chunk):
    def run(fused: bool):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        if fused:
            loss = torch_linear_ce(*leaves, y, chunk)
        else:
            loss = F.cross_entropy(F.linear(*leaves), y)
        torch.autograd.grad(loss, leaves)

    return {"u": lambda: run(False), "f": lambda: run(True)}


def mlx_peak(fn) -> int:
    fn()
    mx.clear_cache()
    mx.reset_peak_memory()
    fn()
    return mx.get_peak_memory()


def measure(args, frameworks: set[str]) -> dict:
    """One row per (framework, hidden size): unfused and fused ms, speedup, MLX peaks."""
    rng = np.random.default_rng(0)
    fns, meta, peaks = {}, {}, {}
    for d in (int(x) for x in args.hidden.split(",")):
        h = rng.standard_normal((args.tokens, d), np.float32)
        w = (0.02 * rng.standard_normal((args.vocab_size, d))).astype(np.float32)
        b = (0.01 * rng.standard_normal(args.vocab_size)).astype(np.float32)
        y = rng.integers(0, args.vocab_size, args.tokens)
        setups = []
        if "mlx" in frameworks:
            chunk = args.chunk_rows or mlx_chunk_rows(d)
            setups.append(("mlx", mlx_fns, chunk, [mx.array(a) for a in (h, w, b, y)]))
        if "torch" in frameworks:
            chunk = args.chunk_rows or torch_chunk_rows(d, torch.device("cpu"))
            setups.append(("torch", torch_fns, chunk, [torch.from_numpy(a) for a in (h, w, b, y)]))
        for framework, make, chunk, inputs in setups:
            for kind, fn in make(*inputs, chunk).items():
                fns[f"{d}/{framework}/{kind}"] = fn
                if framework == "mlx":
                    peaks[f"{d}/{kind}"] = mlx_peak(fn)
            meta[(framework, d)] = chunk
    times = bc.interleaved_times(fns, args.warmup, args.repeats, group_of=bc.framework_of)

    rows = []
    for (framework, d), chunk in meta.items():
        unfused = bc.median(times[f"{d}/{framework}/u"])
        fused = bc.median(times[f"{d}/{framework}/f"])
        row = {
            "framework": framework,
            "hidden": d,
            "chunk_rows": chunk,
            "unfused_ms": 1e3 * unfused,
            "fused_ms": 1e3 * fused,
            "speedup": unfused / fused,
        }
        if framework == "mlx":
            row["mlx_peak_bytes"] = {"unfused": peaks[f"{d}/u"], "fused": peaks[f"{d}/f"]}
        rows.append(row)
    return {"rows": rows}


def measure_exp(args) -> list[dict]:
    """The MLX exponentials on (chunk rows at the first hidden size, vocab) shifted logits."""
    rows = args.chunk_rows or mlx_chunk_rows(int(args.hidden.split(",")[0]))
    logits = 4 * mx.random.normal((rows, args.vocab_size), key=mx.random.key(0))
    x = logits - logits.max(-1, keepdims=True)
    mx.eval(x)
    fns = {name: (lambda f=f: mx.eval(f(x))) for name, f in EXP_FNS.items()}
    times = bc.interleaved_times(fns, args.warmup, 4 * args.repeats)
    medians = {name: bc.median(t) for name, t in times.items()}
    ours = medians["customllm_mlx.loss.exp"]
    return [
        {
            "name": name,
            "shape": list(x.shape),
            "ms": 1e3 * t,
            "ns_per_number": 1e9 * t / x.size,
            "ours_faster_by": t / ours,
        }
        for name, t in medians.items()
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="64,256", help="comma-separated hidden sizes")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the loss's own")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    bc.add_process_args(parser)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    measured = bc.measure_per_process(args, argv, __file__, lambda fw: measure(args, fw))
    if measured is None:  # the torch child: the parent prints
        return {}
    rows = measured["rows"]
    exp_rows = measure_exp(args)

    def peak(r):
        p = r.get("mlx_peak_bytes")
        return f"{bc.fmt_bytes(p['unfused'])} -> {bc.fmt_bytes(p['fused'])}" if p else "-"

    table = bc.markdown_table(
        HEADERS,
        [
            [
                r["framework"],
                r["hidden"],
                r["chunk_rows"],
                f"{r['unfused_ms']:.1f}",
                f"{r['fused_ms']:.1f}",
                bc.fmt_ratio(r["speedup"]),
                peak(r),
            ]
            for r in rows
        ],
    )
    print(
        f"\n## lm_head + cross entropy, value and gradients: {args.tokens} tokens, vocabulary "
        f"{args.vocab_size}, median of {args.repeats} interleaved\n"
    )
    print(table)
    exp_table = bc.markdown_table(
        EXP_HEADERS,
        [
            [
                r["name"],
                f"{r['ms']:.2f}",
                f"{r['ns_per_number']:.2f}",
                bc.fmt_ratio(r["ours_faster_by"]),
            ]
            for r in exp_rows
        ],
    )
    print(f"\n## MLX exponentials on {exp_rows[0]['shape']} shifted logits\n")
    print(exp_table)
    result = {
        "benchmark": "loss",
        "args": vars(args),
        "machine": bc.machine_info(),
        "processes": measured["processes"],
        "rows": rows,
        "table": table,
        "exp_rows": exp_rows,
        "exp_table": exp_table,
    }
    bc.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
