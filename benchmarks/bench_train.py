"""Training throughput: CustomLLM (MLX and torch, eager and compiled) against DeepSeek-V3 peers.

One step = forward + backward + AdamW update (+ our expert-bias update) on random tokens.
Rows: tokens/s, median ms/step over --steps interleaved repeats, peak memory (params and
optimizer state, counted, plus the step's peak growth: resident memory, or CUDA's allocator
on a CUDA device), and MFU against the GEMM peak of the same framework, dtype and device
measured in the same run (see `train_flops_per_token`).

    python benchmarks/bench_train.py --preset tiny --json bench_train.json
    python benchmarks/bench_train.py --preset tiny --diagnostics   # + our variant rows

On a CUDA machine (MLX not needed; `benchmarks/gpu_bench.sh` runs the GPU set), the torch
rows in bfloat16 autocast with float32 weights, as `customllm-torch train --dtype bfloat16`:

    python benchmarks/bench_train.py --preset 973m --frameworks torch --device cuda \
        --dtype bfloat16 --gemm-n 8192
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402  (sets up MLX's CPU BLAS before mlx.core)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402

OURS, MLX_PEER, TORCH_PEER = "customllm", "mlx_lm deepseek_v3", "hf DeepseekV3"
HEADERS = ["system", "framework", "mode", "tokens/s", "ms/step", "peak mem", "MFU", "vs peer"]


@dataclass
class System:
    name: str
    system: str
    framework: str
    mode: str
    run: Any  # one synchronous training step
    state_bytes: Any  # () -> bytes of parameters + optimizer state
    active: int  # active parameters per token
    info: dict[str, Any] = field(default_factory=dict)
    step_peak: Any = None  # () -> bytes a step adds at its peak; default: resident memory

    def step_peak_bytes(self) -> int:
        return self.step_peak() if self.step_peak else bc.step_peak_bytes(self.run)


# --- MLX -------------------------------------------------------------------------------------


def mlx_state_bytes(*trees) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return sum(v.nbytes for tree in trees for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def mlx_system(system: str, cfg: ModelConfig, ids: np.ndarray, mode: str, args) -> System:
    """`mode`: eager | compiled; ours trains with the fused lm_head + loss as `customllm-mlx
    train` does, or with a suffix on the logits: "-logits" our `cross_entropy`, "-stdce"
    mlx.nn.losses.cross_entropy; "-mlxcache": as `customllm-mlx train` but with MLX's own
    32 MiB CPU buffer cache during its steps (the process has the full one, allocator.py).
    Our compiled rows split the batch over CPU streams as `customllm-mlx train` does
    (cpu_streams.py; 2 on a multi-core Linux CPU), except "-onestream"; eager rows do not.
    MLX runs on its default device (the GPU with mlx[cuda] or on a Mac); --dtype bfloat16
    casts the weights, as `customllm-mlx train --dtype bfloat16` does."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from customllm_mlx.allocator import MLX_CPU_DEFAULT
    from customllm_mlx.cpu_streams import blas_threads_per_part, sliced_value_and_grad, stream_parts

    inputs = mx.array(ids)
    variant = mode.partition("-")[2]
    parts = 1
    if system == OURS:
        from customllm_mlx.model import CustomLLM, causal_lm_loss

        model = CustomLLM(cfg)
        loss_kind = "" if variant in ("mlxcache", "onestream") else variant
        if mode.startswith("compiled") and variant != "onestream":
            parts = stream_parts(ids.shape[0])

        def loss_fn(model, inputs, labels):
            if not loss_kind:
                lm, aux, load = model.training_loss(inputs, labels)
                return lm + aux, (lm, load)
            logits, aux, load = model(inputs, return_aux=True)
            if loss_kind == "stdce":
                lm = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), inputs[:, 1:])
                lm = lm.mean()
            else:
                lm = causal_lm_loss(logits, inputs)
            return lm + aux, (lm, load)
    else:
        model = bc.build_mlx_peer(cfg)

        def loss_fn(model, inputs, labels):  # what mlx_lm's trainer does (default_loss)
            logits = model(inputs)[:, :-1]
            loss = nn.losses.cross_entropy(logits, inputs[:, 1:]).mean()
            return loss, (loss, None)

    if args.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
    model.train()
    optimizer = optim.AdamW(learning_rate=args.lr)
    optimizer.init(model.trainable_parameters())
    compiled = mode.startswith("compiled")
    grads_of = sliced_value_and_grad(model, nn.value_and_grad(model, loss_fn), parts, compiled)
    last = mx.full((inputs.shape[0], 1), -100, inputs.dtype)  # all 256 positions, as
    labels = mx.concatenate([inputs[:, 1:], last], 1)  # the peer computes

    def apply(loss, load, grads):
        optimizer.update(model, grads)
        if load is not None:
            model.update_expert_bias(load)
        return loss

    state = [model.state, optimizer.state, mx.random.state]
    if compiled and parts > 1:  # as customllm-mlx train: the slices compiled apart, then the rest
        apply = mx.compile(apply, inputs=state, outputs=state)

    def step(inputs, labels):
        (loss, (_, load)), grads = grads_of(inputs, labels)
        return apply(loss, load, grads)

    if compiled and parts == 1:
        step = mx.compile(step, inputs=state, outputs=state)

    def run():
        if variant == "mlxcache":
            limit = mx.set_cache_limit(MLX_CPU_DEFAULT)
        with blas_threads_per_part(parts):
            loss = step(inputs, labels)
            mx.eval(loss, model.state, optimizer.state)
        if variant == "mlxcache":
            mx.set_cache_limit(limit)

    sizes = bc.named_sizes_mlx(model)
    return System(
        name=f"{system}/mlx/{mode}",
        system=system,
        framework="mlx",
        mode=mode,
        run=run,
        state_bytes=lambda: mlx_state_bytes(model.parameters(), optimizer.state),
        active=bc.active_params(sizes, cfg.n_routed_experts, cfg.num_experts_per_tok),
        info={"cpu_streams": parts, "device": str(mx.default_device())},
    )


# --- torch -----------------------------------------------------------------------------------


def cuda_step_peak(run, device: torch.device) -> int:
    """Bytes CUDA's allocator holds above the state at the peak of one `run()`."""
    bc.torch_sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    return torch.cuda.max_memory_allocated(device) - before


def torch_system(system: str, cfg: ModelConfig, ids: np.ndarray, mode: str, args) -> System:
    """On --device, float32 weights; --dtype bfloat16 runs forward and loss under bfloat16
    autocast, as the Trainer's `bf16=True` (`customllm-torch train --dtype bfloat16`). Ours
    "-loop" (on CUDA only): the routed experts one matmul chain each, not grouped GEMMs."""
    device = torch.device(args.device)
    inputs = torch.from_numpy(ids).long().to(device)
    with device:  # initialised where it trains: 973M weights drawn on the GPU, not copied there
        if system == OURS:
            from customllm_torch.model import CustomLLM

            model = CustomLLM(cfg)
        else:
            model = bc.build_torch_peer(cfg)
    model.to(device).train()
    if mode.endswith("-loop"):
        bc.per_expert_loop(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    forward = torch.compile(model, mode=args.torch_compile_mode) if mode == "compiled" else model
    # ours trains with the fused lm_head + loss, as the Trainer runs it; "-logits": unfused
    extra = {"return_logits": True} if mode.endswith("-logits") else {}

    def autocast():
        if args.dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run():
        with autocast():
            out = forward(inputs, labels=inputs, **extra)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if system == OURS:
            model.update_expert_bias(out.routing)
        bc.torch_sync(device)

    sizes = bc.named_sizes_torch(model)

    def state_bytes():
        opt = optimizer.state.values()
        return sum(p.nbytes for p in model.parameters()) + sum(
            t.nbytes for s in opt for t in s.values() if torch.is_tensor(t)
        )

    return System(
        name=f"{system}/torch/{mode}",
        system=system,
        framework="torch",
        mode=mode,
        run=run,
        state_bytes=state_bytes,
        active=bc.active_params(sizes, cfg.n_routed_experts, cfg.num_experts_per_tok),
        info={"device": str(device)},
        step_peak=(lambda: cuda_step_peak(run, device)) if device.type == "cuda" else None,
    )


# --- main ------------------------------------------------------------------------------------


def diagnostic(system: str, mode: str) -> bool:
    """A row that says where the time goes rather than where we stand: our variants of a mode
    (a "-" suffix: the loss on the logits, one CPU stream, MLX's own buffer cache, the
    per-expert loop on CUDA) and mlx_lm's step uncompiled (its trainer compiles the step)."""
    return "-" in mode or (system == MLX_PEER and mode == "eager")


def row_name(make, system: str, mode: str) -> str:
    return f"{system}/{'mlx' if make is mlx_system else 'torch'}/{mode}"


def plan(args, frameworks: set[str]) -> list[tuple[Any, str, str]]:
    """(make, system, mode) of the rows to run. The `diagnostic` rows run with --diagnostics
    or where --only names them, so that the default run, the comparison, stays a few minutes
    on a 2-core CPU: the tiny preset took 11 min with them all, 7 without our variants (of it
    ~2 min mlx_lm's eager step)."""
    rows = [
        (mlx_system, OURS, "eager"),
        (mlx_system, OURS, "compiled"),
        (mlx_system, OURS, "compiled-onestream"),
        (mlx_system, OURS, "compiled-logits"),
        (mlx_system, OURS, "compiled-stdce"),
        (mlx_system, OURS, "compiled-mlxcache"),
        (mlx_system, MLX_PEER, "eager"),
        (mlx_system, MLX_PEER, "compiled"),
        (torch_system, OURS, "eager"),
        (torch_system, OURS, "eager-logits"),
        (torch_system, TORCH_PEER, "eager"),
    ]
    if args.device.startswith("cuda"):  # the per-expert loop, as before grouped GEMMs
        rows.insert(
            rows.index((torch_system, OURS, "eager-logits")), (torch_system, OURS, "eager-loop")
        )
    if args.torch_compile:
        rows += [(torch_system, OURS, "compiled"), (torch_system, TORCH_PEER, "compiled")]
    planned = []
    for make, system, mode in rows:
        name = row_name(make, system, mode)
        if bc.framework_of(name) not in frameworks or not bc.wants(name, args.only):
            continue
        if diagnostic(system, mode) and not (args.diagnostics or args.only):
            continue
        if mode.endswith("-mlxcache") and args.mlx_default_cache:
            continue  # the same as "compiled" then
        planned.append((make, system, mode))
    return planned


def build_systems(
    args, cfg: ModelConfig, ids: np.ndarray, frameworks: set[str]
) -> tuple[list[System], list[dict]]:
    systems, skipped = [], []
    for make, system, mode in plan(args, frameworks):
        name = row_name(make, system, mode)
        framework = bc.framework_of(name)
        try:
            if framework == "mlx":
                import mlx.core as mx

                mx.random.seed(0)
            torch.manual_seed(0)
            made = make(system, cfg, ids, mode, args)
            tic = time.perf_counter()  # a first step: compiles, and shows the system runs
            made.run()
            made.info["first_step_s"] = round(time.perf_counter() - tic, 2)
            # progress on stderr: a run cut at a deadline (gpu_bench.sh) still says how far it got
            print(f"{name}: first step {made.info['first_step_s']} s", file=sys.stderr, flush=True)
            systems.append(made)
        except Exception as err:  # a peer or compiler that fails here is reported, not fatal
            # (mlx_lm's model in bfloat16 on MLX's CPU: gather_mm takes float32 only; on
            # CUDA, no VJP of its masked attention). An mx.compile that raises while tracing
            # leaves its captured state holding tracers, MLX's global random key among them:
            # every later system, and the GEMM peak, then failed with "eval an array without
            # a primitive" (the first mlx[cuda] run lost our row so). Seeding replaces it.
            if framework == "mlx":
                mx.random.seed(0)
            skipped.append({"name": name, "reason": f"{type(err).__name__}: {err}"[:300]})
            print(f"skipped {name}: {skipped[-1]['reason']}", file=sys.stderr)
    return systems, skipped


def mlx_on_cpu(rows: list[dict]) -> bool:
    return any(r["framework"] == "mlx" and "cpu" in r["device"] for r in rows)


def peer_of(row: dict, rows: list[dict]) -> dict | None:
    if row["system"] != OURS:
        return None
    peer = MLX_PEER if row["framework"] == "mlx" else TORCH_PEER
    candidates = {r["mode"]: r for r in rows if r["system"] == peer}
    default = "compiled" if peer == MLX_PEER else "eager"  # how the peer's trainer runs
    mode = row["mode"].partition("-")[0]  # the same mode, else the peer's default, else any
    return candidates.get(mode) or candidates.get(default) or next(iter(candidates.values()), None)


def vs_peer(row: dict, rows: list[dict]) -> str:
    """The "vs peer" cell: the ratio, with the peer's mode where it is not the row's."""
    if row["ratio_to_peer"] is None:
        return bc.fmt_ratio(None)
    peer = next(r for r in rows if r["name"] == row["peer"])
    other = peer["mode"] != row["mode"].partition("-")[0]
    return bc.fmt_ratio(row["ratio_to_peer"]) + (f" (vs {peer['mode']})" if other else "")


def measure(args, cfg: ModelConfig, frameworks: set[str]) -> dict:
    """Rows of every wanted system in `frameworks`, the skipped ones, and each framework's
    GEMM peak."""
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
    tokens = args.batch * args.seq_len
    systems, skipped = build_systems(args, cfg, ids, frameworks)
    times = bc.interleaved_times(
        {s.name: s.run for s in systems}, args.warmup, args.steps, group_of=bc.framework_of
    )
    peaks = {s.name: s.step_peak_bytes() for s in systems}
    gemm = {
        fw: bc.gemm_peak_flops(
            fw, args.gemm_n, dtype=args.dtype, device=args.device if fw == "torch" else None
        )
        for fw in sorted({s.framework for s in systems})
    }

    rows = []
    for s in systems:
        step_s = bc.median(times[s.name])
        flops = bc.train_flops_per_token(s.active, cfg, args.seq_len)
        rows.append(
            {
                "name": s.name,
                "system": s.system,
                "framework": s.framework,
                "mode": s.mode,
                "tokens_per_s": tokens / step_s,
                "ms_per_step": 1e3 * step_s,
                "step_ms": [round(1e3 * t, 2) for t in times[s.name]],
                "peak_mem_bytes": s.state_bytes() + peaks[s.name],
                "state_bytes": s.state_bytes(),
                "step_peak_rss_growth_bytes": peaks[s.name],
                "active_params": s.active,
                "flops_per_token": flops,
                "mfu": flops * tokens / step_s / gemm[s.framework],
                **s.info,
            }
        )
    return {"rows": rows, "skipped": skipped, "gemm_peak_flops": gemm}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_model_args(parser)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per system (>= 10)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps after each system's first step"
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--gemm-n", type=int, default=2048, help="GEMM peak matrix size (8192 on a GPU)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch rows: cpu | cuda | mps (MLX rows run on MLX's default device)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="bfloat16: torch under autocast (float32 weights), MLX with bfloat16 weights",
    )
    parser.add_argument("--only", default=None, help="comma-separated name substrings")
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="also the rows that say where the time goes (our variants: loss on the logits, "
        "one CPU stream, MLX's own cache, the CUDA loop; mlx_lm uncompiled)",
    )
    parser.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run torch.compile rows (off by default: minutes of compiling on CPU)",
    )
    parser.add_argument(
        "--torch-compile-mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile's mode; reduce-overhead replays CUDA graphs (a launch-bound GPU step)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    bc.add_process_args(parser)
    args = parser.parse_args(argv)

    bc.check_device(args.device)
    cfg = bc.make_config(args, max_position_embeddings=max(1024, args.seq_len))
    measured = bc.measure_per_process(args, argv, __file__, lambda fw: measure(args, cfg, fw))
    if measured is None:  # the torch child: the parent prints
        return {}
    rows, skipped, gemm = measured["rows"], measured["skipped"], measured["gemm_peak_flops"]
    for row in rows:
        peer = peer_of(row, rows)
        row["peer"] = peer and peer["name"]
        row["ratio_to_peer"] = peer and row["tokens_per_s"] / peer["tokens_per_s"]

    table = bc.markdown_table(
        HEADERS,
        [
            [
                r["system"],
                r["framework"],
                r["mode"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['ms_per_step']:.1f}",
                bc.fmt_bytes(r["peak_mem_bytes"]),
                f"{100 * r['mfu']:.1f}%",
                vs_peer(r, rows),
            ]
            for r in rows
        ],
    )
    print(
        f"\n## Training: preset {args.preset}, batch {args.batch} x seq {args.seq_len}, "
        f"{args.dtype}{f', torch on {args.device}' if args.device != 'cpu' else ''}, "
        f"median of {args.steps} interleaved steps after {1 + args.warmup} warm-up\n"
    )
    print(table)
    print(
        f"\n{args.dtype} GEMM peak: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm.items())
        + (f" (torch on {args.device})" if args.device != "cpu" else "")
    )
    if "mlx" in gemm and bc.mlx_openblas(measured) is False and mlx_on_cpu(rows):
        print("warning: MLX ran on its reference BLAS (no OpenBLAS found): slow, MFU meaningless")
    for fw in sorted({r["framework"] for r in rows if r["mfu"] >= 1}):
        print(f"warning: {fw} rows ran faster than the {fw} GEMM peak measured here")
    for s in skipped:
        print(f"skipped {s['name']}: {s['reason']}")
    result = {
        "benchmark": "train",
        "args": vars(args),
        "config": cfg.to_dict(),
        "machine": bc.machine_info(),
        "gemm_peak_flops": gemm,
        "processes": measured["processes"],
        "rows": rows,
        "skipped": skipped,
        "table": table,
    }
    bc.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
