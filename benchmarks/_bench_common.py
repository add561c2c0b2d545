"""Shared helpers of the benchmark scripts: interleaved timing, memory, GEMM peak, FLOPs, peers.

Import this module before `mlx.core` (it imports `customllm_mlx`, which loads OpenBLAS for
MLX's CPU matmuls; on a machine without MLX, a CUDA box, the torch rows run alone). Every
timing is a median over repeats taken round-robin across the systems being compared, so the
noise of a busy machine hits every system alike.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from customllm.config import ModelConfig


def _have_mlx() -> bool:
    try:
        return importlib.util.find_spec("mlx.core") is not None
    except ImportError:  # no mlx package, or one left empty by an uninstall
        return False


HAVE_MLX = _have_mlx()
if HAVE_MLX:
    import customllm_mlx

    customllm_mlx.setup_cpu()  # must precede the first `import mlx.core`

# --- timing ----------------------------------------------------------------------------------


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    seed: int = 0,
    group_of: Callable[[str], str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each synchronous `fn`: `warmup` untimed calls each, then `repeats`
    rounds, each calling every fn once in a freshly shuffled order. With `group_of`, each
    group (a framework) is timed in its own block of rounds: interleaved with MLX, torch ran
    up to 1.6x slower (bench_moe, tiny, torch rows: dense fwd+bwd 11.7 against 7.5 ms)."""
    groups: dict[str, list[str]] = {}
    for name in fns:
        groups.setdefault(group_of(name) if group_of else "", []).append(name)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for names in groups.values():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        for _ in range(repeats):
            order = list(names)
            rng.shuffle(order)
            for name in order:
                tic = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - tic)
    return times


def framework_of(name: str) -> str:
    """The framework part of a row name such as "customllm/mlx/eager" or "x/torch/fwd"."""
    return "torch" if "/torch/" in f"/{name}/" else "mlx"


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- memory ----------------------------------------------------------------------------------
# Resident memory is the one measure both frameworks share on CPU: the kernel's high-water
# mark (VmHWM) is reset through /proc/self/clear_refs before a step and read after it.


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def release_free_memory() -> None:
    """Collect garbage, empty MLX's buffer cache and hand free heap pages back to the OS."""
    gc.collect()
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].clear_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peak_bytes(fn: Callable[[], Any]) -> int:
    """Growth of resident memory during one call of `fn`, at its peak (0 if unsupported)."""
    if not Path("/proc/self/clear_refs").exists():
        return 0
    release_free_memory()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return 0
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- GEMM peak -------------------------------------------------------------------------------


def gemm_peak_flops(
    framework: str,
    n: int = 2048,
    repeats: int = 5,
    dtype: str = "float32",
    device: str | None = None,
) -> float:
    """Best FLOP/s of a square `dtype` matmul in `framework` ("mlx" or "torch", on `device`:
    torch's, default cpu; MLX's default device), over the sizes n, n/2 and n/4: a BLAS is not
    always fastest at the largest size (MLX's reference BLAS ran a model's small matmuls faster
    per FLOP than a 256-wide GEMM, and MFU came out above 1)."""
    sizes = sorted({max(64, n >> shift) for shift in (0, 1, 2)})
    return max(_gemm_flops(framework, size, repeats, dtype, device) for size in sizes)


def _gemm_flops(framework: str, n: int, repeats: int, dtype: str, device: str | None) -> float:
    if framework == "mlx":
        import mlx.core as mx

        a, b = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
        mx.eval(a, b)

        def run():
            mx.eval(a @ b)
    else:
        import torch

        where = torch.device(device or "cpu")
        a, b = (torch.randn(n, n, device=where, dtype=getattr(torch, dtype)) for _ in range(2))

        def run():
            torch.mm(a, b)
            torch_sync(where)

    run()
    repeats = max(repeats, int(2e9 / (2 * n**3)))  # small n: enough calls to catch a quiet one
    best = min(_timed(run) for _ in range(repeats))
    return 2 * n**3 / best


def torch_sync(device) -> None:
    """Wait for a torch device's queued work, so a timed call's time is its own."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_device(device: str) -> None:
    """A clear error for a torch device this machine does not have."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: MPS is not available here")


def _timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


# --- FLOPs -----------------------------------------------------------------------------------

ROUTED_EXPERT_KEYS = ("routed_experts", "switch_mlp", "experts.gate_up_proj", "experts.down_proj")


def active_params(named_sizes: dict[str, int], n_routed: int, top_k: int) -> int:
    """Parameters a token passes through: all except embedding tables, with the routed experts
    counted at top_k / n_routed (shared experts, attention, router, norms and lm_head in full)."""
    total = 0.0
    for name, size in named_sizes.items():
        if "embed" in name and "lm_head" not in name:
            continue  # a table lookup, not a matmul
        if any(key in name for key in ROUTED_EXPERT_KEYS) and "shared" not in name:
            size = size * top_k / n_routed
        total += size
    return int(total)


def train_flops_per_token(active: int, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM / nanoGPT convention):

        6 * N_active  +  6 * L * H * T * (d_qk + d_v)

    6 * N_active: a matmul weight costs 2 FLOPs per token forward and 4 backward.
    The attention term is QK^T (2 * H * T * d_qk per token and layer) and AV (2 * H * T * d_v)
    forward, times 3 for forward + backward, counted over the full T x T square (no halving
    for the causal mask, as PaLM). Elementwise work (norms, softmax, RoPE, SiLU) is not counted.
    """
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attention = (
        6 * cfg.num_hidden_layers * cfg.num_attention_heads * seq_len * (d_qk + cfg.v_head_dim)
    )
    return 6 * active + attention


# --- peers -----------------------------------------------------------------------------------


def peer_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """DeepSeek-V3 configuration equivalent to `cfg`: same widths, depth, experts and latents;
    one expert group, every layer MoE, no dropout."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
        q_lora_rank=cfg.q_latent_dim,
        kv_lora_rank=cfg.kv_latent_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
    )


def build_mlx_peer(cfg: ModelConfig):
    """mlx_lm's DeepSeek-V3, router weights drawn N(0, 0.02) so routing is not all ties."""
    import mlx.core as mx
    from mlx_lm.models import deepseek_v3

    model = deepseek_v3.Model(deepseek_v3.ModelArgs(**peer_kwargs(cfg)))
    for layer in model.model.layers:
        gate = layer.mlp.gate
        gate.weight = cfg.initializer_range * mx.random.normal(gate.weight.shape)
        gate.freeze(keys=["e_score_correction_bias"], recurse=False)
    mx.eval(model.parameters())
    return model


def build_torch_peer(cfg: ModelConfig):
    """transformers' DeepseekV3ForCausalLM (non-interleaved RoPE, as ours; no MTP layers)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        **peer_kwargs(cfg), rope_interleave=False, attention_dropout=0.0, num_mtp_layers=0
    )
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, cfg.initializer_range)
    return model


def per_expert_loop(model) -> None:
    """Our torch model with its routed experts one matmul chain each, not grouped GEMMs (the
    benches' "-loop" rows: CUDA's layout before grouped GEMMs)."""
    for layer in model.decoder_layers:
        layer.mlp.grouped = False


def named_sizes_mlx(model) -> dict[str, int]:
    from mlx.utils import tree_flatten

    return {k: v.size for k, v in tree_flatten(model.trainable_parameters())}


def named_sizes_torch(model) -> dict[str, int]:
    return {k: p.numel() for k, p in model.named_parameters() if p.requires_grad}


# --- arguments -------------------------------------------------------------------------------


def add_model_args(parser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny | small | 973m")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )


def make_config(args, **overrides: Any) -> ModelConfig:
    """The preset with --vocab-size applied; also applies --torch-threads."""
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    return ModelConfig.from_preset(args.preset, **overrides)


# --- output ----------------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    for package in ("mlx", "mlx-lm", "torch", "transformers"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    info["openblas_for_mlx"] = HAVE_MLX and customllm_mlx._blas.loaded
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name()
            info["cuda_version"] = torch.version.cuda
    return info


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
        print(f"wrote {path}")


# --- one process per framework ---------------------------------------------------------------
# customllm_mlx loads OpenBLAS with RTLD_GLOBAL (for MLX), and torch in the same process then
# calls it too: its float32 GEMM ran at 196 GFLOP/s on OpenBLAS's two threads instead of 94 on
# torch's one, and its small MoE matmuls gained less than the dense layer's (tiny MoE against
# dense SwiGLU, fwd+bwd: 1.04x in a torch-only process, 1.26x with OpenBLAS loaded). The torch
# product never loads OpenBLAS, so the torch rows are timed in a child process without it.


mlx_cache_limit: int | None = None  # what _setup_process set


def add_process_args(parser) -> None:
    parser.add_argument(
        "--torch-in-process",
        action="store_true",
        help="time torch in this process too, where OpenBLAS (loaded for MLX) serves its GEMMs",
    )
    parser.add_argument(
        "--mlx-default-cache",
        action="store_true",
        help="keep MLX's 32 MiB CPU buffer cache (default: the full cache our CLIs set, for "
        "every MLX row alike: the allocator is per process)",
    )
    parser.add_argument(
        "--frameworks",
        default=None,
        help="comma-separated: mlx, torch (default: both; torch alone where MLX is not installed)",
    )
    parser.add_argument("--framework-only", choices=("mlx", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)


def wanted_frameworks(args) -> set[str]:
    """--frameworks as a set: both by default, torch alone where MLX is not installed."""
    if args.frameworks is None:
        return {"mlx", "torch"} if HAVE_MLX else {"torch"}
    wanted = {name.strip() for name in args.frameworks.split(",") if name.strip()}
    unknown = wanted - {"mlx", "torch"}
    if unknown or not wanted:
        raise SystemExit(f"--frameworks: expected mlx and/or torch, got {args.frameworks!r}")
    if "mlx" in wanted and not HAVE_MLX:
        raise SystemExit("--frameworks mlx: MLX is not installed here (pip install 'mlx[cpu]')")
    return wanted


def measure_per_process(
    args, argv: list[str] | None, script: str, measure: Callable[[set[str]], dict]
) -> dict | None:
    """`measure(frameworks)` for this process's frameworks, then, where torch is wanted and
    this process loaded OpenBLAS for MLX (unless --torch-in-process), `script` run again in a
    child for its torch rows alone (CUSTOMLLM_OPENBLAS=none), merged in (lists extended, dicts
    updated). In that child: writes what it measured for the parent and returns None (the
    parent prints)."""
    here = _setup_process(args)
    measured = measure(here)
    if args.child_json:
        measured.setdefault("processes", {})[args.framework_only] = process_info(
            times_mlx=args.framework_only == "mlx"
        )
        Path(args.child_json).write_text(json.dumps(measured))
        return None
    measured.setdefault("processes", {})["+".join(sorted(here)) or "none"] = process_info(
        times_mlx="mlx" in here
    )
    if "torch" not in wanted_frameworks(args) or "torch" in here:
        return measured
    argv = sys.argv[1:] if argv is None else list(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.json"
        cmd = [sys.executable, script, *argv, "--framework-only", "torch", "--child-json", str(out)]
        env = {**os.environ, "CUSTOMLLM_OPENBLAS": "none"}
        subprocess.run(cmd, env=env, check=True)
        child = json.loads(out.read_text())
    for key, value in child.items():
        if isinstance(value, list):
            measured.setdefault(key, []).extend(value)
        elif isinstance(value, dict):
            measured.setdefault(key, {}).update(value)
    return measured


def _setup_process(args) -> set[str]:
    """The frameworks this process times (torch too with --torch-in-process, or where MLX is
    not installed, so nothing loaded OpenBLAS); gives MLX the buffer cache of our CLIs unless
    --mlx-default-cache (customllm_mlx/allocator.py)."""
    global mlx_cache_limit
    if args.framework_only:
        frameworks = {args.framework_only}
    else:
        frameworks = wanted_frameworks(args)
        if HAVE_MLX and not args.torch_in_process:
            frameworks -= {"torch"}
    if "mlx" in frameworks and not args.mlx_default_cache:
        from customllm_mlx.allocator import use_full_cpu_cache

        mlx_cache_limit = use_full_cpu_cache()
    return frameworks


def mlx_openblas(measured: dict) -> bool | None:
    """Whether the process that timed the MLX rows had OpenBLAS; None if none did."""
    for name, info in measured.get("processes", {}).items():
        if "mlx" in name.split("+"):
            return info["openblas_loaded"]
    return None


def process_info(times_mlx: bool) -> dict[str, Any]:
    """What this process's timings depend on: OpenBLAS loaded (its path) or not, torch's
    threads, MLX's CPU buffer cache."""
    info: dict[str, Any] = {"openblas_loaded": HAVE_MLX and customllm_mlx._blas.loaded}
    if times_mlx:
        info["mlx_cpu_cache_limit"] = mlx_cache_limit or "MLX's default"
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def wants(name: str, only: str | None) -> bool:
    """`--only` filter: comma-separated substrings of the system names, a part ending in "$"
    matching the name's end ("customllm/mlx/compiled$" keeps that row, not its "-logits"
    variant); None keeps all."""
    if only is None:
        return True
    return any(
        name.endswith(part[:-1]) if part.endswith("$") else part in name
        for part in only.split(",")
        if part.strip("$")
    )
