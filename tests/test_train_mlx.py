"""`customllm-mlx train`: learning, exact resume, signals, balancing, accumulation, checkpoints.

Tiny preset (the test tokenizer's 4,096-token vocabulary: tests/conftest.py), seq_len 32,
batch 4, a few steps each; the runs call `run_training` in-process except where a real process
is needed (SIGTERM).
"""

# ruff: noqa: E402  (customllm_mlx must be imported before mlx.core: it preloads OpenBLAS)

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

customllm_mlx = pytest.importorskip("customllm_mlx")

import mlx.core as mx
import numpy as np
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, TRAIN_TXT
from mlx.utils import tree_flatten

from customllm.config import ModelConfig
from customllm.metrics import EVAL_RECORD_KEYS, TRAIN_RECORD_KEYS, read_metrics
from customllm.runs import CheckpointError, TrainingError, resolve_resume
from customllm.tokenizer import load_tokenizer
from customllm.training import NonFiniteLossError, TrainConfig, lr_at
from customllm_mlx import cpu_streams
from customllm_mlx import model as model_mod
from customllm_mlx import train as train_mod
from customllm_mlx.cli import main as cli
from customllm_mlx.io import load
from customllm_mlx.model import CustomLLM


def options(out: Path, **overrides) -> dict:
    """The tiny run every test starts from: 32 tokens x 4 sequences per micro-batch."""
    values = dict(
        preset="tiny",
        data=str(TRAIN_TXT),
        tokenizer=str(TOKENIZER_DIR),
        seq_len=32,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        steps=4,
        eval_every=0,
        save_every=0,
        keep_last=0,
        sample_every=0,
        out=str(out),
    )
    values.update(overrides)
    if values.get("config") or values.get("init"):  # the model comes from there
        values.pop("preset")
    return values


def train(out: Path, **overrides) -> Path | None:
    return train_mod.run_training(TrainConfig(**options(out, **overrides)))


def config_file(path: Path, **fields) -> str:
    ModelConfig.from_preset("tiny", **fields).to_json(path)
    return str(path)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(checkpoint / "model.safetensors")).items()}


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol == 0:
            assert np.array_equal(wa[key], wb[key]), key
        else:
            np.testing.assert_allclose(wa[key], wb[key], atol=atol, rtol=0, err_msg=key)


# Learning ---------------------------------------------------------------------------------------
def mean_drop(out: Path, window: int) -> float:
    values = [v for _, v in sorted(losses(out).items())]
    return float(np.mean(values[:window]) - np.mean(values[-window:]))


def test_loss_falls_by_one_nat(tmp_path):
    """60 steps of 4 x 32 tokens: the mean loss of the last 20 steps is 1 nat below that of
    the first 20 (it starts near ln(4096) = 8.3; at lr 1e-2 this text's loss spikes)."""
    out = tmp_path / "run"
    train(out, steps=60, warmup_steps=5, lr=5e-3)
    assert mean_drop(out, 20) >= 1.0


@pytest.mark.slow
def test_loss_falls_on_heldout_text(tmp_path):
    """200 steps of 8 x 64 tokens: train loss down 1.5 nats (windows of 20), eval loss down too."""
    out = tmp_path / "run"
    train(out, steps=200, warmup_steps=10, lr=1e-2, batch_size=8, seq_len=64, eval_every=100)
    assert mean_drop(out, 20) >= 1.5
    evals = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] < 8.0


# Exact resume -----------------------------------------------------------------------------------
def test_resume_is_exact(tmp_path):
    """2N steps saving at N, against --resume checkpoint-N into another --out: the same losses
    for steps N+1..2N and identical final weights (dropout on, so the RNG state matters)."""
    config = config_file(
        tmp_path / "dropout.json", embd_dropout=0.1, attn_dropout=0.1, mlp_dropout=0.1
    )
    n = 3
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, config=config, steps=2 * n, save_every=n, grad_accum=2)
    train(
        b, config=config, steps=2 * n, save_every=n, grad_accum=2, resume=str(a / f"checkpoint-{n}")
    )
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(n + 1, 2 * n + 1))
    for step in lb:
        assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
    assert_same_weights(a / f"checkpoint-{2 * n}", b / f"checkpoint-{2 * n}")
    state_a = json.loads((a / f"checkpoint-{2 * n}" / "training_state.json").read_text())
    state_b = json.loads((b / f"checkpoint-{2 * n}" / "training_state.json").read_text())
    assert state_a["data_state"] == state_b["data_state"]
    assert state_a["rng_state"] == state_b["rng_state"]


def test_sigterm_saves_then_resume_matches(tmp_path):
    """SIGTERM mid-run: checkpoint at the end of that step, exit 0; --resume reaches the same
    final weights as an uninterrupted run."""
    steps = 12
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(whole, steps=steps)
    watched = options(cut, steps=steps, log_every=1)  # a console line for step 1
    args = [f"--{k.replace('_', '-')}={v}" for k, v in watched.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "customllm_mlx.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    while not (lines and lines[-1].startswith("step 1/")):  # the first step is done
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines)  # EOF: the run died before its first step
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "resume with --resume" in output
    saved = [p.name for p in cut.glob("checkpoint-*")]
    assert len(saved) == 1, output
    stopped_at = int(saved[0].split("-")[1])
    assert 1 <= stopped_at < steps, output
    assert max(losses(cut)) == stopped_at
    train(cut, steps=steps, resume="latest")
    assert_same_weights(whole / f"checkpoint-{steps}", cut / f"checkpoint-{steps}")
    assert losses(cut) == pytest.approx(losses(whole), abs=1e-6)


# Expert balancing -------------------------------------------------------------------------------
def test_bias_update_evens_expert_loads(tmp_path):
    """Same data, same init: the default balancing (the "solve" bias update) keeps the expert
    loads even where no bias update (the "sign" rule at rate 0) lets them drift (max_vio of the
    worst layer, last 15 of 30 steps: the collapse phase, where the hidden states look alike)."""
    vio = {}
    for name, change in (("off", dict(bias_update="sign", bias_update_rate=0.0)), ("on", {})):
        out = tmp_path / name
        train(out, config=config_file(tmp_path / f"{name}.json", **change), steps=30)
        records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        vio[name] = float(np.mean([r["max_vio"] for r in records[-15:]]))
    assert vio["on"] < vio["off"] - 0.5, vio
    # The final biases moved under balancing and stayed 0 without it.
    model, _ = load(tmp_path / "off" / "checkpoint-30")
    assert all(np.all(np.array(layer.mlp.expert_bias) == 0) for layer in model.layers)
    model, _ = load(tmp_path / "on" / "checkpoint-30")
    assert any(np.any(np.array(layer.mlp.expert_bias) != 0) for layer in model.layers)


# Gradient accumulation and the compiled step ----------------------------------------------------
def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 equal one batch of 8 (the same 8 blocks): losses, grad norms and
    weights after 3 steps agree; the expert bias (from loads summed over micro-batches) exactly,
    under the "sign" rule (the "solve" rule averages the micro-batches' balancing biases, which
    is close to, not equal to, the bias that balances their union)."""
    big, accum = tmp_path / "big", tmp_path / "accum"
    config = config_file(tmp_path / "sign.json", bias_update="sign", bias_update_rate=1e-3)
    train(big, steps=3, batch_size=8, grad_accum=1, config=config)
    train(accum, steps=3, batch_size=4, grad_accum=2, config=config)
    rb = [r for r in read_metrics(big / "metrics.jsonl")]
    ra = [r for r in read_metrics(accum / "metrics.jsonl")]
    for x, y in zip(rb, ra, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["max_vio"] == y["max_vio"]
    wb, wa = weights(big / "checkpoint-3"), weights(accum / "checkpoint-3")
    for key in wb:
        if key.endswith("expert_bias"):
            assert np.array_equal(wb[key], wa[key]), key
        else:
            np.testing.assert_allclose(wb[key], wa[key], atol=2e-5, rtol=0, err_msg=key)


def one_update(seed: int, compiled: bool = True, parts: int = 1):
    """One optimizer step of 2 micro-batches (batch 4, seq 32) from the tiny preset's seed-0
    weights: the step's result and the weights after it."""
    cfg = TrainConfig(**options(Path("unused"), grad_accum=2, max_grad_norm=0.01))
    ids = mx.array(np.random.default_rng(seed).integers(0, 49152, (2, 4, 33)), dtype=mx.int32)
    mx.random.seed(0)
    model = CustomLLM(ModelConfig.from_preset("tiny"))
    mx.eval(model.parameters())
    optimizer = train_mod.make_optimizer(cfg, model)
    optimizer.learning_rate = lr_at(0, cfg)
    world = mx.distributed.init()
    step = train_mod.make_train_step(model, optimizer, cfg, world, compiled=compiled, parts=parts)
    with cpu_streams.blas_threads_per_part(parts):
        acc = step(ids[0], None, False)
        acc = step(ids[1], acc, True)
        mx.eval(acc, model.state)
    return acc, dict(tree_flatten(model.parameters()))


def test_the_step_trains_each_position_on_the_next_token(monkeypatch):
    """The training step's loss sees ids[:, :-1] as inputs and ids[:, 1:] as targets (the
    seed trained on unshifted labels; at initialisation both losses are ~ln(vocab), so the
    loss value alone does not tell them apart), and reports the model's next-token loss."""
    seen = []
    real_loss = train_mod.training_loss

    def training_loss(model, inputs, targets):
        seen.append((inputs, targets))
        return real_loss(model, inputs, targets)

    monkeypatch.setattr(train_mod, "training_loss", training_loss)
    cfg = TrainConfig(**options(Path("unused")))
    ids = mx.array(np.random.default_rng(0).integers(0, 49152, (4, 33)), dtype=mx.int32)
    mx.random.seed(0)
    model = CustomLLM(ModelConfig.from_preset("tiny"))
    expected = model_mod.causal_lm_loss(model(ids), ids).item()
    optimizer = train_mod.make_optimizer(cfg, model)
    optimizer.learning_rate = lr_at(0, cfg)
    step = train_mod.make_train_step(model, optimizer, cfg, mx.distributed.init(), compiled=False)
    acc = step(ids, None, True)
    mx.eval(acc)
    [(inputs, targets)] = seen
    assert mx.array_equal(inputs, ids[:, :-1]) and mx.array_equal(targets, ids[:, 1:])
    assert acc["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_compiled_step_equals_eager_step():
    """One optimizer step (2 micro-batches) through mx.compile and eagerly: same results."""
    (acc_c, w_c), (acc_e, w_e) = one_update(0, compiled=True), one_update(0, compiled=False)
    assert acc_c["loss"].item() == pytest.approx(acc_e["loss"].item(), abs=1e-6)
    assert acc_c["grad_norm"].item() == pytest.approx(acc_e["grad_norm"].item(), rel=1e-5)
    assert acc_c["grad_norm"].item() > 0.01  # the reported norm is the one before clipping
    assert np.array_equal(np.array(acc_c["routing"]), np.array(acc_e["routing"]))
    assert acc_c["routing"][:, 0].sum().item() == 2 * 4 * 32 * 2 * 2  # micro x B x T x k x layers
    for key in w_e:
        np.testing.assert_allclose(np.array(w_c[key]), np.array(w_e[key]), atol=1e-6, err_msg=key)
    assert any(np.any(np.array(w_e[k]) != 0) for k in w_e if k.endswith("expert_bias"))


def test_step_split_over_cpu_streams_equals_unsplit_step():
    """Each micro-batch in 2 slices on 2 CPU streams (cpu_streams.py, the default on a
    multi-core Linux CPU) gives the unsplit step's loss, norm, loads and weights. The expert
    bias moves toward the token-weighted mean of the slices' balancing biases, as it does over
    micro-batches: near the unsplit step's, not equal to it."""
    (acc_1, w_1), (acc_2, w_2) = one_update(1, parts=1), one_update(1, parts=2)
    assert acc_2["loss"].item() == pytest.approx(acc_1["loss"].item(), rel=1e-6)
    assert acc_2["grad_norm"].item() == pytest.approx(acc_1["grad_norm"].item(), rel=1e-5)
    assert np.array_equal(np.array(acc_2["routing"][:, 0]), np.array(acc_1["routing"][:, 0]))
    assert acc_2["routing"][:, 0].sum().item() == 2 * 4 * 32 * 2 * 2  # micro x B x T x k x layers
    for key in w_1:
        tol = 0.02 if key.endswith("expert_bias") else 1e-6
        np.testing.assert_allclose(np.array(w_2[key]), np.array(w_1[key]), atol=tol, err_msg=key)


def test_on_streams_slice_0_stays_on_the_default_stream_and_extra_streams_are_shared():
    """Slice 0 runs where the caller's ops run (on a GPU: the GPU); the others on CPU streams
    made once per process, shared by the training step, evaluation and the benches."""

    def stream_inside():
        return mx.default_stream(mx.default_device())

    first = [fn() for fn in cpu_streams.on_streams(stream_inside, 2, [], compiled=False)]
    again = [fn() for fn in cpu_streams.on_streams(stream_inside, 3, [], compiled=False)]
    assert first[0] == again[0] == stream_inside()
    assert first[1] == again[1] != first[0] and again[2] not in (again[0], again[1])
    assert first[1].device == again[2].device == mx.cpu


def test_checkpointing_takes_mlx_depth_first_order_unless_the_user_chose(monkeypatch):
    """--gradient-checkpointing on the CPU: back to MLX's depth-first order (the split off)
    where setup_cpu chose breadth-first; an order the user set stays."""
    monkeypatch.setattr(customllm_mlx._blas, "bfs_chosen_here", True)
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", str(1 << 20))
    assert cpu_streams.depth_first_for_checkpointing()
    assert os.environ["MLX_BFS_MAX_WIDTH"] == "20" and cpu_streams.stream_parts(8) == 1
    assert not cpu_streams.depth_first_for_checkpointing()  # already depth-first
    monkeypatch.setattr(customllm_mlx._blas, "bfs_chosen_here", False)
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", str(1 << 20))
    assert not cpu_streams.depth_first_for_checkpointing()
    assert os.environ["MLX_BFS_MAX_WIDTH"] == str(1 << 20)


def test_cpu_stream_parts(monkeypatch):
    monkeypatch.delenv(cpu_streams.ENV, raising=False)
    threads = customllm_mlx._blas.threads()
    auto = 2 if threads and threads >= 2 and cpu_streams.breadth_first() else 1
    assert cpu_streams.stream_parts(8) == auto
    assert cpu_streams.stream_parts(7) == 1  # an odd batch is not split
    assert cpu_streams.stream_parts(8, world_size=2) == 1  # ranks share the cores
    assert cpu_streams.stream_parts(8, wanted=4) == 4 and cpu_streams.stream_parts(8, wanted=1) == 1
    with pytest.raises(ValueError, match="--cpu-streams 3 must be >= 1 and divide --batch-size 8"):
        cpu_streams.stream_parts(8, wanted=3)
    monkeypatch.setenv(cpu_streams.ENV, "4")
    assert cpu_streams.stream_parts(8) == 4
    assert cpu_streams.stream_parts(8, wanted=1) == 1  # the option wins
    for bad in ("3", "0", "two"):
        monkeypatch.setenv(cpu_streams.ENV, bad)
        with pytest.raises(ValueError, match=cpu_streams.ENV):
            cpu_streams.stream_parts(8)
    monkeypatch.setenv(cpu_streams.ENV, "4")
    with monkeypatch.context() as patch:  # a GPU's streams are not split, whatever is asked
        patch.setattr(cpu_streams.mx, "default_device", lambda: mx.gpu)
        assert cpu_streams.stream_parts(8) == 1
    monkeypatch.delenv(cpu_streams.ENV)
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "20")  # depth-first: the split would serialize
    assert cpu_streams.stream_parts(8) == 1
    if threads:
        with cpu_streams.blas_threads_per_part(2):
            assert customllm_mlx._blas.threads() == max(1, threads // 2)
        assert customllm_mlx._blas.threads() == threads


# Checkpoints ------------------------------------------------------------------------------------
def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """A save interrupted half-way (weights written, state not) leaves no checkpoint-4 and a
    loadable checkpoint-2; the temp folder a SIGKILL leaves behind is never picked up."""
    out = tmp_path / "run"
    train(out, steps=2)

    def killed(folder, state):
        raise KeyboardInterrupt  # what a kill between two files of the save looks like

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "write_training_state", killed)
        with pytest.raises(KeyboardInterrupt):
            train(out, steps=4, save_every=2, resume="latest")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    model, tokenizer = load(out / "checkpoint-2")
    assert tokenizer is not None and model.model_config.hidden_size == 64
    # SIGKILL gives no chance to clean up: a half-written temp folder stays beside it.
    stale = out / ".checkpoint-4.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    assert resolve_resume("latest", out, framework="mlx") == out / "checkpoint-2"
    train(out, steps=4, save_every=2, resume="latest")
    assert not stale.exists()  # removed by the rotation after the next save
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_cpu_streams_option_is_checked_and_keeps_the_step(tmp_path):
    """--cpu-streams 1 trains the same steps as the default split to float32 rounding; a
    count that does not divide the batch is an Error naming both options."""

    def args(out, **overrides):
        values = options(out, **overrides).items()
        return ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in values if v is not None]]

    bad = CliRunner().invoke(cli, [*args(tmp_path / "bad", steps=2), "--cpu-streams=3"])
    assert bad.exit_code == 1 and "--cpu-streams 3 must be >= 1 and divide --batch-size" in (
        bad.output
    )
    assert not (tmp_path / "bad").exists()
    one = CliRunner().invoke(cli, [*args(tmp_path / "one", steps=3), "--cpu-streams=1"])
    assert one.exit_code == 0, one.output
    train(tmp_path / "auto", steps=3)
    one, auto = losses(tmp_path / "one"), losses(tmp_path / "auto")
    assert list(one) == list(auto) == [1, 2, 3]
    np.testing.assert_allclose(list(one.values()), list(auto.values()), rtol=1e-5)


def test_corrupt_or_mismatched_checkpoint_gives_clear_error(tmp_path):
    out = tmp_path / "run"
    train(out, steps=2)
    ckpt = out / "checkpoint-2"
    args = ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in options(out, steps=4).items()]]
    runner = CliRunner()

    result = runner.invoke(cli, [*args, "--lr=0.01", f"--resume={ckpt}"])
    assert result.exit_code == 1
    assert "options differ" in result.output and "--lr 0.003 -> 0.01" in result.output

    optimizer_file = ckpt / "optimizer.safetensors"
    optimizer_bytes = optimizer_file.read_bytes()
    optimizer_file.write_bytes(optimizer_bytes[:100])
    result = runner.invoke(cli, [*args, f"--resume={ckpt}"])
    assert result.exit_code == 1 and "optimizer.safetensors" in result.output, result.output
    optimizer_file.write_bytes(optimizer_bytes)

    weights_file = ckpt / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])
    result = runner.invoke(cli, [*args, f"--resume={ckpt}"])
    assert result.exit_code == 1
    assert "corrupt" in result.output and "model.safetensors" in result.output, result.output
    assert "Traceback" not in result.output


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(out, steps=2)
    real = model_mod.linear_cross_entropy
    monkeypatch.setattr(model_mod, "linear_cross_entropy", lambda *args: real(*args) * mx.nan)
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        train(out, steps=4, save_every=1, resume="latest")
    assert "checkpoint-2" in str(err.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_resume_rejects_other_world_size_and_missing_state(tmp_path):
    out = tmp_path / "run"
    train(out, steps=1)
    state_file = out / "checkpoint-1" / "training_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(TrainingError, match="2 data-parallel ranks"):
        train(out, steps=2, resume="latest")
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "data_state"}))
    with pytest.raises(CheckpointError, match="data_state"):
        train(out, steps=2, resume="latest")


def test_resume_from_elsewhere_never_writes_over_the_runs_in_out(tmp_path):
    """--resume <a checkpoint of run a> --out <run b's folder> replaced b's checkpoint-1 and
    metrics before: now refused, b untouched; into a's own folder or an empty one it runs."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, steps=1)
    train(b, steps=1, seed=7)
    before = {f.name: f.read_bytes() for f in (b / "checkpoint-1").iterdir()}
    metrics = (b / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="already holds another run.*--out .*a"):
        train(b, steps=2, resume=str(a / "checkpoint-1"))
    assert {f.name: f.read_bytes() for f in (b / "checkpoint-1").iterdir()} == before
    assert (b / "metrics.jsonl").read_bytes() == metrics
    assert train(a, steps=2, resume=str(a / "checkpoint-1")) == a / "checkpoint-2"


# Metrics, evaluation, samples, dtype ------------------------------------------------------------
def test_metrics_have_exactly_the_keys(tmp_path):
    out = tmp_path / "run"
    args = options(
        out,
        steps=4,
        eval_every=2,
        eval_steps=2,
        sample_every=None,
        max_sample_tokens=4,
        keep_last=1,
        save_every=2,
    )
    args.pop("sample_every")
    result = CliRunner().invoke(
        cli, ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
    )
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [2, 4]
    cfg = TrainConfig(**options(out, steps=4))
    for r in train_records:
        assert tuple(r) == TRAIN_RECORD_KEYS
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_sec"] > 0
        assert r["learning_rate"] == pytest.approx(lr_at(r["step"] - 1, cfg))
        assert r["peak_memory_gb"] > 0 and r["max_vio"] >= 0.0
    for r in eval_records:
        assert tuple(r) == EVAL_RECORD_KEYS
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
        assert 5.0 < r["eval_loss"] < 11.5
    assert result.output.count("sample step") == 2  # with each evaluation
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # --keep-last 1
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["step"] == 4 and state["framework"] == "mlx" and state["world_size"] == 1
    assert state["tokens_seen"] == 4 * 4 * 32


def test_bfloat16_model_keeps_bias_float32(tmp_path):
    cfg = TrainConfig(**options(tmp_path / "run", steps=3, dtype="bfloat16"))
    model = train_mod.build_model(cfg, None, load_tokenizer(TOKENIZER_DIR))
    assert model.lm_head.weight.dtype == mx.bfloat16 and model.training
    assert all(layer.mlp.expert_bias.dtype == mx.float32 for layer in model.layers)
    console = io.StringIO()
    last = train_mod.run_training(cfg, stream=console)  # CPU gather_mm: float32 inside
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    slow = "warning: bfloat16 on MLX's CPU backend"
    assert (slow in console.getvalue()) == (mx.default_device() == mx.cpu)
    said = types.SimpleNamespace(lines=[])
    said.print = said.lines.append
    float32 = TrainConfig(**options(tmp_path / "f32"))
    train_mod._announce(said, float32, model, 1, None, None, 1)
    assert said.lines and not any(slow in line for line in said.lines)
    model, _ = load(last)
    assert model.lm_head.weight.dtype == mx.bfloat16
    assert all(layer.mlp.expert_bias.dtype == mx.float32 for layer in model.layers)


def test_heldout_loss_on_cpu_streams_equals_the_loss_of_the_logits():
    """evaluate_loss (lm_head fused into the loss per chunk, each batch in 2 slices on 2 CPU
    streams, compiled; a short last batch in one) equals the token-weighted mean cross entropy
    of the model's logits; the model is back in training mode after it."""
    mx.random.seed(0)
    model = CustomLLM(ModelConfig.from_preset("tiny", vocab_size=512))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 512, (rows, 33)) for rows in (4, 4, 3)]
    model.eval()
    expected = sum(
        train_mod.next_token_loss(model(mx.array(b[:, :-1])), mx.array(b[:, 1:])).item()
        * b[:, 1:].size
        for b in batches
    ) / sum(b[:, 1:].size for b in batches)
    model.train()
    world = mx.distributed.init()
    for slices in (None, train_mod.heldout_slices(model, 2)):
        for _ in range(2):  # the compiled slices again, traced once
            loss, load = train_mod.evaluate_loss(model, batches, world, slices)
            assert loss == pytest.approx(expected, rel=1e-5) and model.training
            assert load.shape == (2, 7) and load.sum() == 2 * 2 * sum(
                b[:, 1:].size for b in batches
            )


def test_model_is_in_train_mode_for_steps_and_eval_mode_for_eval(tmp_path, monkeypatch):
    """The held-out loss and the sample run in eval mode (no dropout), the steps around them in
    train mode: the mode is read while each runs, not only after."""
    seen = {}
    real_evaluate, real_sample = train_mod.evaluate_loss, train_mod.sample_text

    def evaluate(model, batches, world, slices):
        def spied(fn):
            def run(*args):
                seen["during_eval"] = model.training
                return fn(*args)

            return run

        loss = real_evaluate(model, batches, world, [spied(fn) for fn in slices])
        seen["after_eval"] = model.training
        return loss

    def sample(model, tokenizer, prompt, max_tokens):
        seen["before_sample"] = model.training
        return real_sample(model, tokenizer, prompt, max_tokens)

    def generate(model, *args, **kwargs):
        seen["during_sample"] = model.training
        return "sample"

    monkeypatch.setattr(train_mod, "evaluate_loss", evaluate)
    monkeypatch.setattr(train_mod, "sample_text", sample)
    monkeypatch.setattr(train_mod, "generate", generate)
    out = tmp_path / "run"
    train(out, steps=1, eval_every=1, eval_steps=1, sample_every=1)
    assert seen == {
        "during_eval": False,
        "after_eval": True,
        "before_sample": True,
        "during_sample": False,
    }
    assert os.path.isdir(out / "checkpoint-1")


def test_eval_reads_the_heldout_split_or_eval_data(tmp_path, monkeypatch):
    """Without --eval-data the eval set is the held-out split of --data, never training text."""
    calls = []
    real = train_mod.eval_batches

    def record(eval_source, train_source, *args, **kwargs):
        calls.append((eval_source, train_source))
        return real(eval_source, train_source, *args, **kwargs)

    monkeypatch.setattr(train_mod, "eval_batches", record)
    train(tmp_path / "a", steps=1, eval_every=1, eval_steps=1)
    heldout_txt = TRAIN_TXT.with_name("heldout.txt")
    train(tmp_path / "b", steps=1, eval_every=1, eval_steps=1, eval_data=str(heldout_txt))
    assert calls == [(None, str(TRAIN_TXT)), (str(heldout_txt), None)]
    with pytest.raises(TrainingError, match="is the training data"):
        train(tmp_path / "c", steps=1, eval_every=1, eval_data=str(TRAIN_TXT))


# Data parallel ----------------------------------------------------------------------------------
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")


def launch_two_ranks(out: Path, **overrides) -> str:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options(out, **overrides).items()]
    result = subprocess.run(
        [
            str(MLX_LAUNCH),
            "--backend",
            "ring",
            "-n",
            "2",
            sys.executable,
            "-m",
            "customllm_mlx.cli",
            "train",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not MLX_LAUNCH.is_file(), reason="mlx.launch not installed")
def test_two_ranks_match_one_process_and_resume_exactly(tmp_path):
    """2 ranks x 2 sequences (mlx.launch, ring backend on this host) train on the same 4 blocks
    per step as 1 process x 4: same losses, close weights; a 2-rank resume is exact."""
    run = dict(batch_size=2, steps=4, save_every=2, eval_every=2, eval_steps=2)
    output = launch_two_ranks(tmp_path / "dist", **run)
    assert "2 rank(s)" in output
    train(tmp_path / "single", **{**run, "batch_size": 4})
    dist, single = (
        read_metrics(tmp_path / "dist" / "metrics.jsonl"),
        read_metrics(tmp_path / "single" / "metrics.jsonl"),
    )
    assert [sorted(r) for r in dist] == [sorted(r) for r in single]
    for a, b in zip(dist, single, strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)  # float32 sums in another order
    # AdamW can turn rounding in a near-zero gradient into a step of up to lr (3e-3) each
    # step, the losses above are the tight check
    assert_same_weights(
        tmp_path / "dist" / "checkpoint-4", tmp_path / "single" / "checkpoint-4", atol=2e-2
    )
    state = json.loads((tmp_path / "dist" / "checkpoint-4" / "training_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data_state"]) == len(state["rng_state"]) == 2
    launch_two_ranks(tmp_path / "dist2", **run, resume=str(tmp_path / "dist" / "checkpoint-2"))
    assert_same_weights(tmp_path / "dist" / "checkpoint-4", tmp_path / "dist2" / "checkpoint-4")


# A run never saves a broken model and owns its --out -------------------------------------------
def test_a_diverging_run_never_saves_a_non_finite_checkpoint(tmp_path):
    """--lr 1e6: the weights blow up within a few steps. The run stops at the first non-finite
    loss, gradient norm or weight, naming the last good checkpoint, and every checkpoint left
    holds finite weights (the rotation never removes the last good one for a broken one)."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(out, steps=30, lr=1e6, warmup_steps=1, save_every=1, keep_last=1)
    left = sorted(out.glob("checkpoint-*"))
    assert len(left) <= 1
    for folder in left:
        assert folder.name in str(err.value)
        assert all(np.isfinite(w).all() for w in weights(folder).values()), folder
    if not left:
        assert "no checkpoint was saved" in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight_decay=float("nan")), "--weight-decay must be a finite number"),
        (dict(max_grad_norm=float("nan")), "--max-grad-norm must be a finite number"),
        (dict(lr=float("inf")), "--lr must be a finite number"),
        (dict(max_sample_tokens=0), "--max-sample-tokens must be positive"),
        (dict(batch_size=100_000_000), r"--batch-size 100000000 x --seq-len \d+ needs at least"),
    ],
)
def test_options_that_would_break_the_run_are_refused_at_start(tmp_path, change, message):
    with pytest.raises(TrainingError, match=message):
        train(tmp_path / "run", **change)
    assert not (tmp_path / "run").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    """While a run holds --out (its lock), another run there stops before writing anything;
    the lock goes with the run."""
    from customllm.runs import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(TrainingError, match="in use by another training run"):
            train(out, steps=1)
        assert list(out.iterdir()) == []
    assert train(out, steps=1) == out / "checkpoint-1"


def test_a_new_run_drops_the_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n')
    train(out, steps=2)
    assert [r["loss"] != 99.0 for r in read_metrics(out / "metrics.jsonl")] == [True, True]


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """Too little room: refused before writing; a write that fails midway (the disk filled
    up): a TrainingError naming the last good checkpoint, which stays intact."""
    import collections

    import customllm.runs as runs

    out = tmp_path / "run"
    train(out, steps=1)
    before = weights(out / "checkpoint-1")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(TrainingError, match="not enough disk space for checkpoint-2.*checkpoint-1"):
        train(out, steps=2, save_every=1, resume="latest")

    monkeypatch.undo()

    def full(*args, **kwargs):
        monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
        raise RuntimeError("[write] Unable to write 2980796 bytes")

    monkeypatch.setattr(train_mod.mx, "save_safetensors", full)
    with pytest.raises(TrainingError, match="cannot write checkpoint-2.*the disk is full"):
        train(out, steps=2, save_every=1, resume="latest")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    after = weights(out / "checkpoint-1")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """--gradient-checkpointing recomputes each layer in the backward pass: without dropout
    (the tiny preset) the run is the same to rounding; with dropout, the recomputation draws
    the masks the forward drew (test_model_mlx.py)."""
    plain = train(tmp_path / "plain", steps=3)
    checkpointed = train(tmp_path / "checkpointed", steps=3, gradient_checkpointing=True)
    np.testing.assert_allclose(
        list(losses(tmp_path / "checkpointed").values()),
        list(losses(tmp_path / "plain").values()),
        rtol=1e-5,
    )
    assert_same_weights(plain, checkpointed, atol=1e-5)
