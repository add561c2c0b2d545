"""One MoE layer against a dense SwiGLU of the same active FLOPs, forward and backward.

The MoE layer is `LlamaMLP` (1 shared + top-2 of 7 routed SwiGLU experts, intermediate I);
the dense layer is one SwiGLU with intermediate 3 * I, i.e. the FLOPs a token spends in the
shared and its two routed experts. MoE time / dense time is the dispatch overhead (routing,
sort, gather, scatter, the per-expert matmuls). The backward forms the gradients of the
weights and of the input, as in a model (`--no-input-grad`: the weights' only). Also timed,
for comparison: the peers' MoE layers (mlx_lm's DeepseekV3MoE, transformers'
DeepseekV3MoE) and, in MLX, dispatch variants of ours (the model is untouched): one row per
gather_mm entry (`sorted_experts`, the GPU path) instead of the CPU's blocks, `gather_mm`
without the `sorted_indices` flag, one plain matmul per expert over its contiguous sorted
slice, the blocks' GEMMs whole where ours runs them in column chunks (small, 973m), and the
layer without its routed GEMMs and without any routed experts (a breakdown of our time, and
the floor of the ratio); in torch, ours with its grouped GEMMs (CUDA's layout; torch >= 2.10)
beside the per-expert loop the CPU runs. The MLX rows run as `customllm-mlx train` runs its
layers: on a multi-core Linux CPU the batch in two slices on two CPU streams (`--cpu-streams 1`:
one stream, OpenBLAS on all cores). Last, it counts the nodes of the compiled fwd+bwd graphs of
the dense layer and ours (`graph_ops`): on MLX's Linux CPU backend each node costs a fixed few
microseconds besides its work.

    python benchmarks/bench_moe.py --preset tiny --json bench_moe.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import re
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402  (sets up MLX's CPU BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402
from customllm_mlx.experts import swiglu  # noqa: E402  (the model's activation, in every variant)

HEADERS = [
    "layer",
    "framework",
    "mode",
    "fwd ms",
    "fwd+bwd ms",
    "tokens/s (fwd+bwd)",
    "fwd vs dense",
    "fwd+bwd vs dense",
]


# --- MLX dispatch variants (bound onto an instance of our LlamaMLP) ---------------------------


def _sorted_pairs(mlp, x_flat, idx):
    flat_expert = idx.flatten()  # (N * k,)
    order = mx.stop_gradient(mx.argsort(flat_expert))
    return order, x_flat[order // mlp.top_k], flat_expert[order]


def _unsort(mlp, out, order, idx, weights):
    out = out[mx.argsort(order)].reshape(*idx.shape, -1)  # (N, k, D)
    return (out * weights[..., None]).sum(axis=1)


def dispatch_sorted_rows(mlp, x_flat, idx, weights, load):
    """Ours as on the GPU (and on CPU before the blocked layout): one (1, D) row per gather_mm
    batch entry, which MLX's CPU backend runs as one GEMV per row."""
    order = mx.stop_gradient(mx.argsort(idx.flatten()))
    out = mlp.sorted_experts(x_flat, idx.flatten(), order)
    return (out.reshape(*idx.shape, -1) * weights[..., None]).sum(axis=1)


def dispatch_gather_unflagged(mlp, x_flat, idx, weights, load):
    """Ours with `sorted_indices=False`: same sort, same gather_mm, no flag."""
    order, xs, experts = _sorted_pairs(mlp, x_flat, idx)
    e = mlp.routed_experts

    def linear(layer, h):
        return mx.gather_mm(h, layer.weight.swapaxes(-1, -2), rhs_indices=experts)

    xs = xs[:, None]
    out = linear(e.down_proj, swiglu(linear(e.gate_proj, xs), linear(e.up_proj, xs)))[:, 0]
    return _unsort(mlp, out, order, idx, weights)


def dispatch_expert_slices(mlp, x_flat, idx, weights, load):
    """One dense matmul chain per expert over its contiguous slice of the sorted pairs
    (the counts are read on the host: eager only, like the torch model's dispatch)."""
    order, xs, _ = _sorted_pairs(mlp, x_flat, idx)
    e, outs, start = mlp.routed_experts, [], 0
    for i, count in enumerate(load.tolist()):
        if count:
            seg = xs[start : start + count]
            h = swiglu(seg @ e.gate_proj.weight[i].T, seg @ e.up_proj.weight[i].T)
            outs.append(h @ e.down_proj.weight[i].T)
        start += count
    return _unsort(mlp, mx.concatenate(outs), order, idx, weights)


def _scaled_rows(experts, x, block_expert, segments):
    """`StackedExperts.blocks` without its GEMMs and activation: each block row scaled (a
    weight gradient kept). Our layer with it, where it takes the blocked dispatch, costs the
    router, the shared expert, the sort, the padded-row bookkeeping, the gathers and the
    weighted sum; less `dispatch_none`'s time, the last four."""
    return x * experts.down_proj.weight[0, :, 0]


WHOLE = "customllm MoE (block GEMMs whole)"


def whole_block_gemms(fn):
    """`fn` with the blocked dispatch's column chunks off (`experts.chunk_columns`), the
    block GEMMs whole as before them: its traces (a compiled row: the first call) see that."""
    from customllm_mlx import experts

    def run():
        chunk_columns, experts.chunk_columns = experts.chunk_columns, lambda *args: None
        try:
            return fn()
        finally:
            experts.chunk_columns = chunk_columns

    return run


def dispatch_none(mlp, x_flat, idx, weights, load):
    """No routed experts: what is left is the router, top-k, aux loss and the shared expert
    (the routing weights still get a gradient). Its time plus two `dense SwiGLU (I)` chains
    (the routed pairs are 2 x tokens rows) is what the layer would cost with routed GEMMs as
    fast per row as plain ones and no sort, gather or scatter: the floor of the ratio."""
    return x_flat * weights.sum(-1, keepdims=True)


# --- layers ----------------------------------------------------------------------------------


def mlx_layers(cfg: ModelConfig, tokens: int) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, compilable); every module maps (B, T, D) -> y (or (y, ...)). `tokens`:
    per call (CPU stream slice); "no routed GEMMs" only where ours takes the blocked layout."""
    from mlx_lm.models import deepseek_v3

    from customllm_mlx.experts import chunk_columns, cpu_block_rows
    from customllm_mlx.model import DeepSeekExpertLayer, LlamaMLP

    D, inter = cfg.hidden_size, cfg.intermediate_size
    layers = {
        "dense SwiGLU (3I)": (DeepSeekExpertLayer(D, 3 * inter), True),
        "dense SwiGLU (I)": (DeepSeekExpertLayer(D, inter), True),
    }
    ours = LlamaMLP(cfg)
    layers["customllm MoE"] = (ours, True)
    pairs = tokens * cfg.num_experts_per_tok
    if ours.routed_experts.blocked_dispatch(pairs):
        g = cpu_block_rows(D, inter, pairs, cfg.n_routed_experts)
        if chunk_columns(g, D, inter) or chunk_columns(g, inter, D):
            layers[WHOLE] = (LlamaMLP(cfg), True)  # the same layer, timed by `whole_block_gemms`
        mlp = LlamaMLP(cfg)
        mlp.routed_experts.blocks = types.MethodType(_scaled_rows, mlp.routed_experts)
        layers["customllm MoE (no routed GEMMs)"] = (mlp, True)
    for label, fn in (
        ("sorted rows", dispatch_sorted_rows),
        ("gather_mm unflagged", dispatch_gather_unflagged),
        ("per-expert slices", dispatch_expert_slices),
        ("router + shared only", dispatch_none),
    ):
        mlp = LlamaMLP(cfg)
        mlp.dispatch = types.MethodType(fn, mlp)
        layers[f"customllm MoE ({label})"] = (mlp, fn is not dispatch_expert_slices)
    peer = deepseek_v3.DeepseekV3MoE(deepseek_v3.ModelArgs(**bc.peer_kwargs(cfg)))
    peer.gate.weight = cfg.initializer_range * mx.random.normal(peer.gate.weight.shape)
    peer.gate.freeze(keys=["e_score_correction_bias"], recurse=False)
    layers["mlx_lm DeepseekV3MoE"] = (peer, True)
    for module, _ in layers.values():
        if isinstance(module, LlamaMLP):  # same N(0, 0.02) weights as the model's init
            module.update(
                nn.utils.tree_map(
                    lambda w: (
                        cfg.initializer_range * mx.random.normal(w.shape) if w.ndim > 1 else w
                    ),
                    module.parameters(),
                )
            )
        mx.eval(module.parameters())
    return layers


def output(module: nn.Module, x: mx.array) -> mx.array:
    """The layer's output (ours and mlx_lm's MoE return a tuple: its first item)."""
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def fwd_bwd(module: nn.Module, input_grad: bool):
    """`(x, cot) -> (value, grads)` of sum(module(x) * cot): the weights' gradients, and x's
    with `input_grad`."""

    def loss(params, x, cot):
        module.update(params)
        return (output(module, x) * cot).sum()

    grad = mx.value_and_grad(loss, argnums=(0, 1) if input_grad else 0)
    return lambda x, cot: grad(module.trainable_parameters(), x, cot)


def mlx_fns(
    module: nn.Module, x: mx.array, cot: mx.array, compiled: bool, input_grad: bool, parts: int
):
    """fwd and fwd+bwd of `module` on x. `parts` > 1: the batch in that many slices, each on
    its own CPU stream with OpenBLAS at 1 / parts of its threads, as `customllm-mlx train`
    runs its layers on a multi-core Linux CPU (customllm_mlx/cpu_streams.py)."""
    from customllm_mlx.cpu_streams import blas_threads_per_part, on_streams

    # each slice on its stream and compiled on its own, as customllm-mlx train runs them;
    # outputs too: value_and_grad leaves its traced parameters in the module
    state = module.state
    fwd_slices = on_streams(lambda x, cot: output(module, x), parts, state, compiled)
    bwd_slices = on_streams(fwd_bwd(module, input_grad), parts, state, compiled)

    def sliced(fns, x):
        xs, cots = (mx.split(a, parts) if parts > 1 else [a] for a in (x, cot))
        return [fn(*args) for fn, *args in zip(fns, xs, cots, strict=True)]

    def fwd(x):
        outs = sliced(fwd_slices, x)
        return mx.concatenate(outs) if parts > 1 else outs[0]

    def bwd(x):  # the slices' values and gradients (evaluated, not summed)
        return sliced(bwd_slices, x)

    def run(fn):
        with blas_threads_per_part(parts):
            mx.eval(fn(x))

    return (lambda: run(fwd)), (lambda: run(bwd))


# primitives that make no new buffer (a view of their input), each still one node MLX schedules
VIEW_OPS = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "ExpandDims",
    "Broadcast",
    "Flatten",
    "Unflatten",
    "Slice",
    "AsStrided",
    "View",
}
GRAPH_LAYERS = ("dense SwiGLU (3I)", "customllm MoE")  # `graph_ops` counted and printed


def graph_ops(module: nn.Module, x: mx.array, cot: mx.array, input_grad: bool) -> dict:
    """The nodes of `module`'s compiled fwd+bwd graph on x (one CPU stream's slice), as MLX
    evaluates them (`mx.export_to_dot` of the compiled call's outputs): every node is one task
    on its stream, and on the Linux CPU each pays a fixed cost besides its work. "kernels":
    the nodes that compute (fused elementwise kernels, GEMMs, gathers, sorts, ...); "views":
    reshapes, transposes and the like, which only schedule."""
    from mlx.utils import tree_flatten

    state = module.state
    step = mx.compile(fwd_bwd(module, input_grad), state, state)
    dot = io.StringIO()
    mx.export_to_dot(dot, *(a for _, a in tree_flatten(step(x, cot))))
    names = re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue())
    mx.eval(state)  # the module holds the call's outputs: leave nothing lazy for the timing
    ops = collections.Counter(name.split(" ")[0] for name in names)
    views = sum(n for name, n in ops.items() if name in VIEW_OPS)
    return {
        "nodes": sum(ops.values()),
        "views": views,
        "kernels": sum(ops.values()) - views,
        "by_op": dict(ops.most_common()),
    }


def view_node_us(nodes: int = 200, repeats: int = 50) -> float:
    """Microseconds MLX spends on one node that does no work: a compiled chain of `nodes`
    reshapes against none, on one stream, (1024, 64) floats, median of `repeats`."""
    x = mx.zeros((1024, 64))

    def chain(n):
        def f(a):
            for i in range(n):
                a = a.reshape(64, 1024) if i % 2 == 0 else a.reshape(1024, 64)
            return a + 1

        return mx.compile(f)

    fns = {n: chain(n) for n in (0, nodes)}
    times = bc.interleaved_times({n: lambda f=f: mx.eval(f(x)) for n, f in fns.items()}, 3, repeats)
    return 1e6 * (bc.median(times[nodes]) - bc.median(times[0])) / nodes


def torch_layers(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    from customllm_torch.model import DeepSeekExpertLayer, LlamaMLP

    one_layer = dataclasses.replace(cfg, num_hidden_layers=1)
    peer = bc.build_torch_peer(one_layer).model.layers[0].mlp  # its experts implementation
    layers = {
        "dense SwiGLU (3I)": DeepSeekExpertLayer(cfg.hidden_size, 3 * cfg.intermediate_size),
        "customllm MoE": LlamaMLP(cfg),
        "hf DeepseekV3MoE": peer,
    }
    with torch.no_grad():
        for module in layers.values():
            for p in module.parameters():
                p.normal_(0.0, cfg.initializer_range)
    if hasattr(torch.nn.functional, "grouped_mm"):  # CUDA's layout, timed where this runs
        grouped = LlamaMLP(cfg)
        grouped.load_state_dict(layers["customllm MoE"].state_dict())
        grouped.grouped = True
        layers["customllm MoE (grouped GEMMs)"] = grouped
    return layers


def torch_fns(module: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor, input_grad: bool):
    x.requires_grad_(input_grad)

    def output():
        y = module(x)
        return y[0] if isinstance(y, tuple) else y

    def fwd():
        with torch.no_grad():
            output()

    def bwd():
        (output() * cot).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return fwd, bwd


# --- main ------------------------------------------------------------------------------------


def measure(args, cfg: ModelConfig, frameworks: set[str]) -> dict:
    """Rows of fwd and fwd+bwd times of every wanted layer in `frameworks`."""
    shape = (args.batch, args.seq_len, cfg.hidden_size)
    rng = np.random.default_rng(0)
    x_np, cot_np = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    mx.random.seed(0)
    torch.manual_seed(0)
    fns, meta = {}, {}
    graphs = {}
    if "mlx" in frameworks:
        tokens = args.batch * args.seq_len // args.cpu_streams
        for name, (module, compilable) in mlx_layers(cfg, tokens).items():
            if name in GRAPH_LAYERS and bc.wants(f"{name}/mlx/compiled", args.only):
                one = args.batch // args.cpu_streams
                graphs[name] = graph_ops(
                    module, mx.array(x_np[:one]), mx.array(cot_np[:one]), args.input_grad
                )
            for mode in ("eager", "compiled") if compilable else ("eager",):
                key = f"{name}/mlx/{mode}"
                if bc.wants(key, args.only):
                    fwd, bwd = mlx_fns(
                        module,
                        mx.array(x_np),
                        mx.array(cot_np),
                        mode == "compiled",
                        args.input_grad,
                        args.cpu_streams,
                    )
                    if name == WHOLE:
                        fwd, bwd = whole_block_gemms(fwd), whole_block_gemms(bwd)
                    fns[key + "/fwd"], fns[key + "/bwd"] = fwd, bwd
                    meta[key] = (name, "mlx", mode)
    if "torch" in frameworks:
        for name, module in torch_layers(cfg).items():
            key = f"{name}/torch/eager"
            if bc.wants(key, args.only):
                fwd, bwd = torch_fns(
                    module, torch.from_numpy(x_np), torch.from_numpy(cot_np), args.input_grad
                )
                fns[key + "/fwd"], fns[key + "/bwd"] = fwd, bwd
                meta[key] = (name, "torch", "eager")
    times = bc.interleaved_times(fns, args.warmup, args.repeats, group_of=bc.framework_of)

    tokens = args.batch * args.seq_len
    rows = []
    for key, (name, framework, mode) in meta.items():
        fwd, bwd = bc.median(times[key + "/fwd"]), bc.median(times[key + "/bwd"])
        rows.append(
            {
                "name": key,
                "layer": name,
                "framework": framework,
                "mode": mode,
                "fwd_ms": 1e3 * fwd,
                "fwd_bwd_ms": 1e3 * bwd,
                "tokens_per_s": tokens / bwd,
            }
        )
    measured = {"rows": rows}
    if graphs:
        measured.update(graphs=graphs, view_node_us=view_node_us())
    return measured


def dispatch_floor(by_key: dict, framework: str, mode: str) -> float | None:
    """fwd+bwd ratio to the dense layer that a dispatch with routed GEMMs as fast per row as
    plain ones, and nothing else, would reach (see `dispatch_none`); None without the rows."""
    times = _fwd_bwd_ms(
        by_key,
        framework,
        mode,
        ("customllm MoE (router + shared only)", "dense SwiGLU (I)", "dense SwiGLU (3I)"),
    )
    if times is None:
        return None
    rest, one_chain, dense = times
    return (rest + 2 * one_chain) / dense


def _fwd_bwd_ms(by_key: dict, framework: str, mode: str, layers) -> list[float] | None:
    """The fwd+bwd ms of `layers` in `framework` and `mode`; None if a row is missing."""
    rows = [by_key.get((layer, framework, mode)) for layer in layers]
    return None if None in rows else [r["fwd_bwd_ms"] for r in rows]


def breakdown(by_key: dict, framework: str, mode: str) -> dict | None:
    """Our layer's fwd+bwd ms in three parts: the router and shared expert (`dispatch_none`),
    the dispatch without the expert GEMMs (the `_scaled_rows` layer less that), and the
    routed experts' GEMMs and activation (the rest); None without the rows (MLX only)."""
    times = _fwd_bwd_ms(
        by_key,
        framework,
        mode,
        (
            "customllm MoE",
            "customllm MoE (no routed GEMMs)",
            "customllm MoE (router + shared only)",
        ),
    )
    if times is None:
        return None
    full, no_gemms, rest = times
    return {
        "router_shared_ms": rest,
        "dispatch_ms": no_gemms - rest,
        "routed_experts_ms": full - no_gemms,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_model_args(parser)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)  # ratios move ~10% at 10
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated name substrings")
    parser.add_argument(
        "--no-input-grad",
        dest="input_grad",
        action="store_false",
        help="backward forms the weight gradients only; by default it forms the input "
        "gradient too, as in a model",
    )
    parser.add_argument(
        "--cpu-streams",
        type=int,
        default=None,
        help="MLX rows: the batch in N slices on N CPU streams (default: as customllm-mlx "
        "train splits its batch here, customllm_mlx/cpu_streams.py; 1: one stream)",
    )
    parser.add_argument("--json", default=None)
    bc.add_process_args(parser)
    args = parser.parse_args(argv)
    if args.cpu_streams is None:
        from customllm_mlx.cpu_streams import stream_parts

        args.cpu_streams = stream_parts(args.batch)
    if args.cpu_streams < 1 or args.batch % args.cpu_streams:
        parser.error(f"--cpu-streams {args.cpu_streams} must be >= 1 and divide --batch")

    cfg = bc.make_config(args)
    measured = bc.measure_per_process(args, argv, __file__, lambda fw: measure(args, cfg, fw))
    if measured is None:  # the torch child: the parent prints
        return {}
    rows = measured["rows"]
    tokens = args.batch * args.seq_len
    by_key = {(r["layer"], r["framework"], r["mode"]): r for r in rows}
    for row in rows:
        dense = by_key.get(("dense SwiGLU (3I)", row["framework"], row["mode"]))
        row["fwd_vs_dense"] = dense and row["fwd_ms"] / dense["fwd_ms"]
        row["fwd_bwd_vs_dense"] = dense and row["fwd_bwd_ms"] / dense["fwd_bwd_ms"]

    table = bc.markdown_table(
        HEADERS,
        [
            [
                r["layer"],
                r["framework"],
                r["mode"],
                f"{r['fwd_ms']:.2f}",
                f"{r['fwd_bwd_ms']:.2f}",
                f"{r['tokens_per_s']:,.0f}",
                bc.fmt_ratio(r["fwd_vs_dense"]),
                bc.fmt_ratio(r["fwd_bwd_vs_dense"]),
            ]
            for r in rows
        ],
    )
    print(
        f"\n## MoE layer vs dense SwiGLU: preset {args.preset}, {tokens} tokens "
        f"(batch {args.batch} x seq {args.seq_len}), median of {args.repeats} interleaved; "
        f"MLX on {args.cpu_streams} CPU stream(s)\n"
    )
    print(table)
    for r in rows:
        if r["layer"] == "customllm MoE":
            print(
                f"dispatch overhead ratio ({r['framework']}, {r['mode']}): fwd "
                f"{bc.fmt_ratio(r['fwd_vs_dense'])}, fwd+bwd {bc.fmt_ratio(r['fwd_bwd_vs_dense'])}"
            )
            floor = dispatch_floor(by_key, r["framework"], r["mode"])
            if floor:
                r["fwd_bwd_floor_vs_dense"] = floor
                print(
                    f"  floor (router + shared only, plus 2 x dense SwiGLU (I)): fwd+bwd "
                    f"{bc.fmt_ratio(floor)}"
                )
            parts = breakdown(by_key, r["framework"], r["mode"])
            if parts:
                r["fwd_bwd_parts_ms"] = parts
                one_chain = by_key.get(("dense SwiGLU (I)", r["framework"], r["mode"]))
                chains = one_chain and f" (2 x dense SwiGLU (I): {2 * one_chain['fwd_bwd_ms']:.2f})"
                print(
                    f"  fwd+bwd ms: router + shared {parts['router_shared_ms']:.2f}, sort / "
                    f"gather / weighted sum {parts['dispatch_ms']:.2f}, routed experts "
                    f"{parts['routed_experts_ms']:.2f}" + (chains or "")
                )
    graphs = measured.get("graphs", {})
    if graphs:
        print(
            "MLX compiled fwd+bwd graph, one CPU stream's slice (nodes = kernels + views): "
            + ", ".join(
                f"{name} {g['nodes']} = {g['kernels']} + {g['views']}" for name, g in graphs.items()
            )
            + f"; a node that does no work (a view) takes {measured['view_node_us']:.1f} us"
        )
    result = {
        "benchmark": "moe",
        "args": vars(args),
        "config": cfg.to_dict(),
        "machine": bc.machine_info(),
        "processes": measured["processes"],
        "rows": rows,
        "graphs": graphs,
        "view_node_us": measured.get("view_node_us"),
        "table": table,
    }
    bc.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
