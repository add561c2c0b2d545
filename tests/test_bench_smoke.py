"""The benchmark scripts run end to end on a minimal size and write sane tables and JSON.

The three model scripts start together as subprocesses (most of each run is importing torch, MLX
and transformers), with the tiny preset, a 512-token vocabulary, seq 32, batch 2 and 2 repeats;
with them bench_train's torch rows as on a CUDA machine without MLX (in bfloat16, on the CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_DIR, TOKENIZER_DIR

SMALL = ["--preset", "tiny", "--vocab-size", "512"]
RUNS = {
    "train": [
        "--diagnostics",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--gemm-n",
        "256",
    ],
    "generate": [
        "--contexts",
        "16,32",
        "--prefill-repeats",
        "2",
        "--decode-repeats",
        "2",
        "--warmup",
        "1",
        "--e2e-tokens",
        "4",
        "--e2e-repeats",
        "1",
    ],
    # 128 tokens per CPU stream: the blocked CPU dispatch (and its breakdown) at the smallest
    "moe": ["--seq-len", "128", "--batch", "2", "--repeats", "2", "--warmup", "1"],
}
# bench_train where `import mlx` fails (the GPU machine's image has torch, not MLX)
NO_MLX = "import runpy, sys; sys.modules['mlx'] = None; sys.argv[0] = {script!r}; " + (
    "runpy.run_path({script!r}, run_name='__main__')"
)
TORCH_BF16 = ["--dtype", "bfloat16", "--device", "cpu", "--only", "eager"]
HEADERS = {
    "train": "| system | framework | mode | tokens/s | ms/step | peak mem | MFU | vs peer |",
    "generate": "| system | framework | context | prefill tok/s | decode tok/s |",
    "moe": "| layer | framework | mode | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) |",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    out = tmp_path_factory.mktemp("bench")
    procs = {}
    commands = {name: [str(REPO_DIR / "benchmarks" / f"bench_{name}.py")] for name in RUNS}
    extras = {  # without MLX (the GPU machine's image), on an explicit torch device
        "train_no_mlx": [*RUNS["train"], *TORCH_BF16],
        "generate_no_mlx": [*RUNS["generate"], "--device", "cpu"],
    }
    for name in extras:
        script = str(REPO_DIR / "benchmarks" / f"bench_{name.split('_')[0]}.py")
        commands[name] = ["-c", NO_MLX.format(script=script)]
    for name, start in commands.items():
        path = out / f"{name}.json"
        extra = RUNS[name] if name in RUNS else extras[name]
        cmd = [sys.executable, *start, *SMALL, *extra, "--json", str(path)]
        procs[name] = (
            subprocess.Popen(
                cmd, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ),
            path,
        )
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()


def finish(runs, name: str) -> tuple[str, dict]:
    proc, path = runs[name]
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:]
    return stdout, json.loads(path.read_text())


def product_streams(batch: int) -> int:
    """The CPU streams `customllm-mlx train` splits a batch over on this machine."""
    from customllm_mlx.cpu_streams import stream_parts

    return stream_parts(batch)


def test_bench_train(runs):
    stdout, result = finish(runs, "train")
    assert HEADERS["train"] in stdout
    names = {row["name"] for row in result["rows"]}
    for name in (
        "customllm/mlx/eager",
        "customllm/mlx/compiled",
        "customllm/mlx/compiled-onestream",
        "customllm/torch/eager",
        "mlx_lm deepseek_v3/mlx/eager",
        "hf DeepseekV3/torch/eager",
    ):
        assert name in names, result["skipped"]
    openblas = result["processes"]["mlx"]["openblas_loaded"]  # what bench_train warns on
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["peak_mem_bytes"] > 0
        # On MLX's reference BLAS (no OpenBLAS on the machine) small matmuls can beat any
        # square GEMM per FLOP; the bench says so instead (asserted below).
        if row["framework"] == "torch" or openblas:
            assert row["mfu"] < 1, row
        if row["system"] == "customllm":
            assert row["ratio_to_peer"] > 0
    assert all(v > 0 for v in result["gemm_peak_flops"].values())
    streams = {
        r["mode"]: r["cpu_streams"] for r in result["rows"] if r["name"].startswith("customllm/mlx")
    }
    assert streams["compiled"] == product_streams(2) and streams["compiled-onestream"] == 1
    if not openblas:
        assert "MLX ran on its reference BLAS" in stdout


def test_bench_train_torch_alone_without_mlx(runs):
    """What benchmarks/gpu_bench.sh runs on a CUDA machine: no MLX there, torch rows alone, timed
    in this one process, bfloat16 autocast, MFU against the bfloat16 GEMM peak."""
    stdout, result = finish(runs, "train_no_mlx")
    assert "bfloat16, median of" in stdout and "bfloat16 GEMM peak: torch" in stdout
    assert {r["name"] for r in result["rows"]} == {
        "customllm/torch/eager",
        "customllm/torch/eager-logits",
        "hf DeepseekV3/torch/eager",
    }, result["skipped"]
    assert set(result["processes"]) == {"torch"}  # no child process, no OpenBLAS
    assert result["processes"]["torch"]["openblas_loaded"] is False
    assert result["machine"]["mlx"] is None or result["machine"]["openblas_for_mlx"] is False
    assert list(result["gemm_peak_flops"]) == ["torch"]
    for row in result["rows"]:
        assert row["device"] == "cpu" and 0 < row["mfu"] < 1 and row["first_step_s"] > 0
        if row["system"] == "customllm":
            assert row["ratio_to_peer"] > 0


def test_bench_train_rejects_what_it_cannot_run():
    script = str(REPO_DIR / "benchmarks" / "bench_train.py")
    for args, message in (
        (["--frameworks", "jax"], "--frameworks: expected mlx and/or torch, got 'jax'"),
        (["--device", "cuda"] if not torch_cuda() else ["--device", "mps"], "--device"),
    ):
        proc = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-c", NO_MLX.format(script=script), "--frameworks", "mlx"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "MLX is not installed here" in proc.stderr


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bench_generate(runs):
    stdout, result = finish(runs, "generate")
    assert HEADERS["generate"] in stdout
    assert len(result["rows"]) == 8  # 4 systems x 2 contexts
    for row in result["rows"] + result["e2e"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    ours = next(r for r in result["rows"] if r["name"] == "customllm/mlx")
    cfg = result["config"]
    latent = cfg["kv_latent_dim"] + cfg["num_attention_heads"] * cfg["qk_rope_head_dim"]
    assert ours["kv_bytes_per_token_per_layer"] == 4 * latent  # float32 c_kv + k_rope


def test_bench_generate_torch_alone_without_mlx(runs):
    """bench_generate where MLX is not installed (the GPU machine's image), --device given: the
    torch rows alone, ours against transformers', with their ratios and the e2e row."""
    stdout, result = finish(runs, "generate_no_mlx")
    assert HEADERS["generate"] in stdout
    assert {r["name"] for r in result["rows"]} == {"customllm/torch", "hf DeepseekV3/torch"}
    assert result["args"]["device"] == "cpu"
    for row in result["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["system"] != "customllm" or row["decode_ratio_to_peer"] > 0
    assert [r["name"] for r in result["e2e"]] == ["customllm/torch/stream_generate"] * 2


def test_bench_moe(runs):
    stdout, result = finish(runs, "moe")
    assert HEADERS["moe"] in stdout and "dispatch overhead ratio" in stdout
    assert result["args"]["input_grad"]  # the backward of a layer in a model
    assert result["args"]["cpu_streams"] == product_streams(2)  # as customllm-mlx train runs
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["fwd_ms"] > 0
    ours = [r for r in result["rows"] if r["layer"] == "customllm MoE" and r["framework"] == "mlx"]
    assert ours and all(r["fwd_bwd_floor_vs_dense"] > 0 for r in ours)
    assert "floor (router + shared only" in stdout
    assert all(set(r["fwd_bwd_parts_ms"]) == set(PARTS) for r in ours)
    assert "sort / gather / weighted sum" in stdout
    graphs = result["graphs"]  # the compiled fwd+bwd graphs' nodes, counted
    assert set(graphs) == {"dense SwiGLU (3I)", "customllm MoE"}
    assert result["view_node_us"] > 0  # a node costs time: the chain of reshapes is slower
    assert all(g["nodes"] == g["kernels"] + g["views"] > 0 for g in graphs.values())
    assert "MLX compiled fwd+bwd graph" in stdout


def test_bench_moe_counts_the_compiled_graphs_nodes():
    """`graph_ops` counts what MLX evaluates: the dense layer's 3 forward GEMMs and 2 per
    weight backward (its gradient and the input's), and in our blocked layer the same work as
    3 + 3 block GEMMs (`gather_mm`) and one GEMM per expert for each weight (`segmented_mm`)."""
    import mlx.core as mx

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import bench_moe

    from customllm.config import ModelConfig
    from customllm_mlx.model import DeepSeekExpertLayer, LlamaMLP

    x, cot = mx.random.normal((1, 128, 64)), mx.random.normal((1, 128, 64))
    dense = bench_moe.graph_ops(DeepSeekExpertLayer(64, 384), x, cot, input_grad=True)
    assert dense["by_op"]["Matmul"] == 9 and "GatherMM" not in dense["by_op"]
    weights_only = bench_moe.graph_ops(DeepSeekExpertLayer(64, 384), x, cot, input_grad=False)
    # without x's gradient: 3 forward, 3 weight gradients and the down projection's input's
    assert weights_only["by_op"]["Matmul"] == 7
    moe = bench_moe.graph_ops(LlamaMLP(ModelConfig.from_preset("tiny")), x, cot, input_grad=True)
    assert moe["by_op"]["GatherMM"] == 6 and moe["by_op"]["SegmentedMM"] == 3
    assert moe["kernels"] > dense["kernels"] and moe["nodes"] == moe["kernels"] + moe["views"]


PARTS = ("router_shared_ms", "dispatch_ms", "routed_experts_ms")


def test_bench_moe_no_gemm_variant_routes_rows_back(monkeypatch):
    """The breakdown's "no routed GEMMs" layer runs our blocked bookkeeping with each block row
    scaled by s: every token must come back as x * s * (sum of its routing weights)."""
    import types

    import mlx.core as mx

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import bench_moe

    from customllm.config import ModelConfig
    from customllm_mlx.model import LlamaMLP

    mlp = LlamaMLP(ModelConfig.from_preset("tiny"))
    mlp.routed_experts.blocks = types.MethodType(bench_moe._scaled_rows, mlp.routed_experts)
    mlp.routed_experts.down_proj.weight = mx.random.normal(
        mlp.routed_experts.down_proj.weight.shape
    )
    x = mx.random.normal((200, 64))
    _, idx, weights = mlp.route(x)
    load = (idx[..., None] == mx.arange(mlp.num_experts)).sum(axis=(0, 1))
    assert mlp.routed_experts.blocked_dispatch(idx.size)  # 400 pairs
    out = mlp.dispatch(x, idx, weights, load)
    s = mlp.routed_experts.down_proj.weight[0, :, 0]
    expected = x * s * weights.sum(-1, keepdims=True)
    assert mx.allclose(out, expected, rtol=1e-5, atol=1e-6).item()
    rows = {
        (layer, "mlx", "compiled"): {"fwd_bwd_ms": ms}
        for layer, ms in (
            ("customllm MoE", 10.0),
            ("customllm MoE (no routed GEMMs)", 4.5),
            ("customllm MoE (router + shared only)", 3.0),
        )
    }
    parts = bench_moe.breakdown(rows, "mlx", "compiled")
    assert parts == dict(zip(PARTS, (3.0, 1.5, 5.5), strict=True))
    assert bench_moe.breakdown(rows, "torch", "eager") is None
    # the "block GEMMs whole" row: chunks off while it runs (and traces), on again after
    from customllm_mlx import experts

    monkeypatch.setattr(experts, "SMALL_BLOCK_GEMM", 100**3)  # an OpenBLAS with the kernel
    whole = bench_moe.whole_block_gemms(lambda: experts.chunk_columns(32, 256, 512))
    assert whole() is None and experts.chunk_columns(32, 256, 512) == 64


def test_bench_loss(tmp_path):
    path = tmp_path / "loss.json"
    args = ["--hidden", "16,32", "--tokens", "64", "--vocab-size", "512", "--repeats", "2"]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_DIR / "benchmarks" / "bench_loss.py"),
            *args,
            "--json",
            str(path),
        ],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| framework | hidden | chunk rows | unfused ms | fused ms | speedup |" in proc.stdout
    rows = json.loads(path.read_text())["rows"]
    assert {(r["framework"], r["hidden"]) for r in rows} == {
        (f, d) for f in ("mlx", "torch") for d in (16, 32)
    }
    for row in rows:
        assert row["unfused_ms"] > 0 and row["fused_ms"] > 0 and row["chunk_rows"] >= 32


@pytest.mark.slow
def test_gpu_bench_script_on_cpu(tmp_path):
    """benchmarks/gpu_bench.sh, the benchmark run for a CUDA machine, end to end on the CPU at a
    minimal size: every step writes its table, JSON and log (slow: minutes on a small CPU)."""
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "PRESET": "tiny",
        "BATCH": "2",
        "SEQ": "32",
        "STEPS": "2",
        "TRAIN_STEPS": "2",
        "GEMM_N": "256",
        "PYTHON": sys.executable,
        "TOKENIZER": str(TOKENIZER_DIR),
        "RUN_DIR": str(tmp_path / "run"),
        "STAGES": "torch_eager mlx product product_compiled torch_compiled generate",
        "GEN_CONTEXTS": "16,32",
        "DEADLINE": "850",
    }
    proc = subprocess.run(
        ["bash", str(REPO_DIR / "benchmarks" / "gpu_bench.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = {
        "train_torch_eager": {"customllm/torch/eager", "hf DeepseekV3/torch/eager"},
        "train_torch_compiled": {"customllm/torch/compiled", "hf DeepseekV3/torch/compiled"},
        "train_mlx": {"customllm/mlx/compiled"},  # mlx_lm's peer: no bfloat16 gather_mm on CPU
    }
    for step, wanted in names.items():
        result = json.loads((tmp_path / f"{step}.json").read_text())
        assert result["args"]["dtype"] == "bfloat16"
        rows = {r["name"]: r for r in result["rows"]}
        assert wanted <= set(rows), (step, result["skipped"])
        assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows.values())
        # (MLX's CPU bfloat16 GEMM runs without BLAS: its rows can beat that "peak")
        assert all(r["mfu"] < 1 for r in rows.values() if r["framework"] == "torch")
        assert (tmp_path / f"{step}.log").read_text().count("GEMM peak") == 1
    generate = json.loads((tmp_path / "generate_torch.json").read_text())
    assert {r["name"] for r in generate["rows"]} == {"customllm/torch", "hf DeepseekV3/torch"}
    assert all(r["decode_tokens_per_s"] > 0 for r in generate["rows"])
    for name, run in (
        ("product_torch_train", "run"),
        ("product_torch_train_compiled", "run-compiled"),
    ):
        log = (tmp_path / f"{name}.log").read_text()
        assert "step 2/2" in log and "(bfloat16)" in log
        assert (tmp_path / run / "checkpoint-2" / "model.safetensors").exists()


def test_only_filter_anchors_a_part_ending_in_dollar():
    """`--only 'customllm/mlx/compiled$'` keeps that row and not its "-logits" variant (the GPU
    run's MLX step); a plain part still matches anywhere in the name."""
    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import _bench_common as bc

    names = ["customllm/mlx/compiled", "customllm/mlx/compiled-logits", "deepseek_v3/mlx/compiled"]
    kept = [n for n in names if bc.wants(n, "customllm/mlx/compiled$,deepseek_v3/mlx/compiled$")]
    assert kept == ["customllm/mlx/compiled", "deepseek_v3/mlx/compiled"]
    assert [n for n in names if bc.wants(n, "compiled")] == names
    assert not bc.wants("customllm/mlx/compiled", "$") and bc.wants("anything", None)


def test_bench_train_runs_diagnostic_rows_only_when_asked():
    """The default run is the comparison: ours eager and compiled, mlx_lm compiled (as its
    trainer runs), transformers eager. The rows that say where the time goes (our variants,
    mlx_lm uncompiled; the tiny preset's run took 11 min with them on the 2-core machine) come
    with --diagnostics or where --only names them; CUDA adds the per-expert loop among them."""
    import types

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import bench_train

    def names(frameworks=("mlx", "torch"), **given):
        args = dict(device="cpu", torch_compile=False, mlx_default_cache=False, only=None)
        args = types.SimpleNamespace(**{**args, "diagnostics": False, **given})
        return [bench_train.row_name(*row) for row in bench_train.plan(args, set(frameworks))]

    assert names() == [
        "customllm/mlx/eager",
        "customllm/mlx/compiled",
        "mlx_lm deepseek_v3/mlx/compiled",  # as mlx_lm's trainer runs it; eager: a diagnostic
        "customllm/torch/eager",
        "hf DeepseekV3/torch/eager",
    ]
    everything = names(diagnostics=True)
    assert len(everything) == 11 and "customllm/mlx/compiled-stdce" in everything
    assert "customllm/mlx/compiled-mlxcache" not in names(diagnostics=True, mlx_default_cache=True)
    assert names(only="customllm/mlx/compiled") == [
        "customllm/mlx/compiled",
        "customllm/mlx/compiled-onestream",
        "customllm/mlx/compiled-logits",
        "customllm/mlx/compiled-stdce",
        "customllm/mlx/compiled-mlxcache",
    ]
    assert names(("torch",), device="cuda", only="eager") == [
        "customllm/torch/eager",
        "customllm/torch/eager-loop",
        "customllm/torch/eager-logits",
        "hf DeepseekV3/torch/eager",
    ]
    assert names(("torch",), device="cuda", torch_compile=True) == [
        "customllm/torch/eager",
        "hf DeepseekV3/torch/eager",
        "customllm/torch/compiled",
        "hf DeepseekV3/torch/compiled",
    ]

    # each of our rows against the peer in its mode, else the mode the peer's trainer runs
    def row(system, framework, mode, tokens_per_s):
        name = f"{system}/{framework}/{mode}"
        return dict(
            name=name, system=system, framework=framework, mode=mode, tokens_per_s=tokens_per_s
        )

    rows = [
        row("customllm", "mlx", "eager", 500.0),
        row("customllm", "mlx", "compiled", 1500.0),
        row("customllm", "mlx", "compiled-logits", 600.0),
        row("mlx_lm deepseek_v3", "mlx", "compiled", 250.0),
        row("customllm", "torch", "compiled", 900.0),
        row("hf DeepseekV3", "torch", "eager", 300.0),
    ]
    for r in rows:
        peer = bench_train.peer_of(r, rows)
        r["peer"] = peer and peer["name"]
        r["ratio_to_peer"] = peer and r["tokens_per_s"] / peer["tokens_per_s"]
    cells = [bench_train.vs_peer(r, rows) for r in rows]
    assert cells == ["2.00x (vs compiled)", "6.00x", "2.40x", "-", "3.00x (vs eager)", "-"]


def test_a_system_failing_while_compiling_spares_the_others(monkeypatch):
    """mlx_lm's model made to fail while its compiled step traces (as MLX's CUDA attention has
    no VJP with respect to a mask): it is skipped, and our compiled system built before it
    still steps. Without the re-seed, MLX's random key held a tracer: "eval an array without a
    primitive" (the first mlx[cuda] run)."""
    mx = pytest.importorskip("mlx.core")
    import types

    import numpy as np
    from mlx_lm.models import deepseek_v3

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import bench_train

    from customllm.config import ModelConfig

    @mx.custom_function
    def no_vjp(q):
        return q * 1

    @no_vjp.vjp
    def no_vjp_vjp(primals, cotangent, output):
        raise ValueError("no VJP here (simulated)")

    sdpa = deepseek_v3.scaled_dot_product_attention
    monkeypatch.setattr(
        deepseek_v3, "scaled_dot_product_attention", lambda q, *a, **k: sdpa(no_vjp(q), *a, **k)
    )
    args = types.SimpleNamespace(
        device="cpu", torch_compile=False, mlx_default_cache=False, dtype="float32", lr=1e-3,
        only="customllm/mlx/compiled$,deepseek_v3/mlx/compiled$", diagnostics=False,
    )  # fmt: skip
    cfg = ModelConfig.from_preset("tiny", vocab_size=512)
    ids = np.random.default_rng(0).integers(0, 512, (2, 16))
    systems, skipped = bench_train.build_systems(args, cfg, ids, {"mlx"})
    assert [s["name"] for s in skipped] == ["mlx_lm deepseek_v3/mlx/compiled"]
    assert "no VJP here" in skipped[0]["reason"]
    assert [s.name for s in systems] == ["customllm/mlx/compiled"]
    systems[0].run()  # raised "eval an array without a primitive" before the fix
    mx.eval(mx.random.normal((2,)))


@pytest.mark.skipif(not hasattr(__import__("torch").nn.functional, "grouped_mm"), reason="torch")
def test_count_ops_grouped_experts_launch_fewer_ops(tmp_path):
    """benchmarks/count_ops.py at a minimal size: the grouped GEMMs take fewer kernel ops and
    matmuls per layer than the per-expert loop (7 experts x 3 projections x fwd and bwd)."""
    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import count_ops

    argv = "--layers 2 --hidden 64 --heads 2 --latent 16 --intermediate 128 --vocab-size 512"
    result = count_ops.main([*argv.split(), "--batch", "2", "--seq-len", "32", "--by-op", "3"])
    grouped, loop = result["rows"]["customllm (grouped GEMMs)"], result["rows"]["customllm (loop)"]
    assert grouped["kernel_ops"]["_grouped_mm"] > 0 and "_grouped_mm" not in loop["kernel_ops"]
    # RoPE's cos and sin: made once a step, not in each layer (2 layers here)
    assert grouped["kernel_ops"]["cos"] == grouped["kernel_ops"]["sin"] == 0.5
    assert grouped["kernel_ops_per_layer"] < loop["kernel_ops_per_layer"]
    assert loop["mm_per_layer"] - grouped["mm_per_layer"] >= 40
    assert all(
        r["all_ops_per_layer"] > r["kernel_ops_per_layer"] > 0 for r in result["rows"].values()
    )


def test_bench_quality_and_balance_report(tmp_path):
    """bench_quality.py on the tiny preset, 3 steps, one seed: both models train with the
    same command line, both are evaluated on any --eval-data file, and the table, JSON, PNG
    and samples come out; balance_report.py reads the MoE's metrics."""
    from customllm.stories import story
    from customllm.tokenizer import train_tokenizer

    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(f"Tom had {i} red balls and a dog." for i in range(200)))
    train = tmp_path / "train.txt"
    train.write_text("\n<|endoftext|>\n".join(story(i) for i in range(1, 200)))
    train_tokenizer("builtin", 400, tmp_path / "tok")
    out = tmp_path / "quality"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_quality.py", "--preset", "tiny", "--steps", "3",
         "--batch-size", "2", "--seq-len", "32", "--seeds", "0", "--data", str(train),
         "--eval-data", str(text), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
         "--train-eval-batches", "2"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "quality.json").read_text())
    kinds = {r["kind"]: r for r in report["runs"]}
    assert set(kinds) == {"moe", "dense"} and report["tokens_per_model"] == 3 * 2 * 32
    assert (
        kinds["moe"]["train_max_vio_mean"] is not None and kinds["dense"]["heldout_max_vio"] is None
    )
    for r in kinds.values():
        assert 4 < r["heldout_loss"] < 12 and len(r["curve"]) == 3 and r["sample"]
        fit = json.loads((out / "seed0" / r["kind"] / "eval-train.json").read_text())
        assert r["train_text_loss"] == fit["loss"] and fit["tokens"] == 2 * 8 * 32
    assert report["paired_difference"] == [
        pytest.approx(kinds["dense"]["heldout_loss"] - kinds["moe"]["heldout_loss"])
    ]
    assert "paired difference dense - MoE" in proc.stdout
    dense = json.loads((out / "dense.json").read_text())
    assert dense["n_routed_experts"] == 0 and dense["intermediate_size"] == 3 * 128
    if importlib.util.find_spec("matplotlib"):
        assert (out / "quality.png").stat().st_size > 1000
    proc = subprocess.run(
        [sys.executable, "benchmarks/balance_report.py", str(out / "seed0" / "moe"), "--from-step", "2"],
        cwd=REPO_DIR, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and "3 steps | from step 2:" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [sys.executable, "benchmarks/balance_report.py", str(out / "missing")],
        cwd=REPO_DIR, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("Error: ") and "missing" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "benchmarks/bias_replay.py", "--model", str(out / "seed0" / "moe" / "checkpoint-3"),
         "--data", str(train), "--eval-data", str(text), "--batches", "4", "--eval-batches", "2",
         "--batch-size", "2", "--seq-len", "32", "--rates", "0.5,0.2",
         "--json", str(tmp_path / "replay.json")],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rates = json.loads((tmp_path / "replay.json").read_text())["rates"]
    assert [r["rate"] for r in rates] == [0.5, 0.2]
    for r in rates:  # 4 batches: the share is a multiple of 1/4
        assert r["balanced_share"] * 4 == round(r["balanced_share"] * 4)
        assert 0 <= r["mean_max_vio"] <= 2.5 and 0 <= r["heldout_max_vio"] <= 2.5
