"""`customllm-torch train`: the loss falls, resume is exact, signals and failures leave loadable
checkpoints, the expert bias balances loads, metrics and evaluation are right.

Tiny preset, the test tokenizer and text (tests/conftest.py: built from the repository's
built-in corpus); float32 on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    HELDOUT_TXT,
    TOKENIZER_DIR,
    TRAIN_TXT,
)
from safetensors.torch import load_file

import customllm_torch.model as torch_model
import customllm_torch.train as torch_train
from customllm.config import ModelConfig
from customllm.data import StreamDataset
from customllm.metrics import EVAL_RECORD_KEYS, TRAIN_RECORD_KEYS, read_metrics
from customllm.runs import latest_checkpoint, list_checkpoints, read_training_state, resolve_resume
from customllm.tokenizer import load_tokenizer
from customllm.training import NonFiniteLossError, TrainConfig, TrainingError
from customllm_torch.cli import main as cli
from customllm_torch.io import load


def tiny(out: Path, **overrides) -> TrainConfig:
    """6 steps of the tiny preset, 2 x 32 tokens a step, checkpoints at 3 and 6."""
    values = dict(
        preset="tiny",
        data=str(TRAIN_TXT),
        tokenizer=str(TOKENIZER_DIR),
        seq_len=32,
        batch_size=2,
        steps=6,
        warmup_steps=2,
        lr=5e-3,
        eval_every=3,
        eval_steps=1,
        save_every=3,
        keep_last=0,
        max_sample_tokens=4,
        out=str(out),
    )
    values.update(overrides)
    if values.get("config") or values.get("init"):  # the model comes from there
        values.pop("preset")
    return TrainConfig(**values)


def train(cfg: TrainConfig) -> Path:
    return torch_train.run_training(cfg, "cpu", stream=io.StringIO())


def as_argv(cfg: TrainConfig) -> list[str]:
    argv = []
    for key, value in cfg.to_dict().items():
        default = TrainConfig.__dataclass_fields__[key].default
        if value is not None and value != default and key != "min_lr":
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (checkpoints 3 and 6)."""
    out = tmp_path_factory.mktemp("reference")
    train(tiny(out))
    return out


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory) -> tuple[str, Path]:
    """The tiny model with dropout (so a resume must restore the RNG state too): its
    config.json, and an uninterrupted 6-step run of it (checkpoints 3 and 6)."""
    folder = tmp_path_factory.mktemp("dropout")
    config = folder / "dropout.json"
    dropout = dict(embd_dropout=0.1, attn_dropout=0.1, mlp_dropout=0.1)
    ModelConfig.from_preset("tiny", **dropout).to_json(config)
    train(tiny(folder / "run", config=str(config)))
    return str(config), folder / "run"


# The loop ---------------------------------------------------------------------------------------
def test_loss_falls_and_metrics_have_the_keys(tmp_path):
    cfg = tiny(
        tmp_path,
        seq_len=32,
        batch_size=4,
        steps=60,
        warmup_steps=5,
        eval_every=30,
        eval_steps=2,
        save_every=0,
        keep_last=1,
    )
    last = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 61))
    assert all(tuple(r) == TRAIN_RECORD_KEYS for r in train_records)
    assert [r["step"] for r in eval_records] == [30, 60]
    assert all(tuple(r) == EVAL_RECORD_KEYS for r in eval_records)
    for r in eval_records:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
    losses = [r["loss"] for r in train_records]
    first, final = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first - final >= 1.0, (first, final)
    assert eval_records[-1]["eval_loss"] < losses[0] - 1.0
    assert all(r["grad_norm"] > 0 and r["tokens_per_sec"] > 0 for r in train_records)
    assert all(r["peak_memory_gb"] > 0 and r["max_vio"] >= 0 for r in train_records)
    assert train_records[0]["learning_rate"] == pytest.approx(1e-3)  # warmup: 5e-3 * 1 / 5

    # the last checkpoint is a canonical model folder beside the Trainer's files
    assert last == tmp_path / "checkpoint-60" and list_checkpoints(tmp_path) == [(60, last)]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_state.json",
    ):
        assert (last / name).is_file(), name
    model, tokenizer = load(last)
    assert tokenizer is not None and model.model_config.vocab_size == len(tokenizer)
    state = read_training_state(last)
    assert state["step"] == 60 and state["framework"] == "torch"
    assert state["tokens_seen"] == 60 * 4 * 32
    assert state["train_config"]["lr"] == 5e-3


def test_exact_resume_from_checkpoint_n(dropout_run, tmp_path):
    # Resume the 6-step run from its step-3 checkpoint into another folder (dropout on).
    config, reference = dropout_run
    last = train(tiny(tmp_path, config=config, resume=str(reference / "checkpoint-3")))
    resumed, full = train_losses(tmp_path), train_losses(reference)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    assert last == tmp_path / "checkpoint-6"
    assert_same_weights(last, reference / "checkpoint-6")
    # again from the step-3 checkpoint: tmp_path now holds a run, which it would replace
    with pytest.raises(TrainingError, match="already holds another run"):
        train(tiny(tmp_path, config=config, resume=str(reference / "checkpoint-3")))
    assert_same_weights(last, reference / "checkpoint-6")


def test_sigterm_saves_and_resume_reaches_the_same_weights(dropout_run, tmp_path):
    config, reference = dropout_run
    cfg = tiny(tmp_path, config=config)
    # The child must bind the BLAS this process uses (conftest preloads OpenBLAS for MLX, and
    # torch's sgemm then resolves to it): the last bits of float32 results depend on it.
    preload = (
        "import customllm_mlx; customllm_mlx.setup_cpu(); "
        if "customllm_mlx" in sys.modules
        else ""
    )
    cli_main = preload + "from customllm_torch.cli import main; main()"
    run = subprocess.Popen(
        [sys.executable, "-c", cli_main, "train", "--device", "cpu", *as_argv(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and train_losses(tmp_path)) and run.poll() is None:
        assert time.time() < deadline, "the run logged no step"
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    stopped = latest_checkpoint(tmp_path)
    step = read_training_state(stopped)["step"]
    assert 1 <= step < 6 and f"stopped at step {step} by SIGTERM" in output, output
    assert load(stopped)[0] is not None

    last = train(dataclasses.replace(cfg, resume="latest"))
    assert last == tmp_path / "checkpoint-6"
    assert_same_weights(last, reference / "checkpoint-6")
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]  # no step logged twice


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real = torch_train.write_training_state

    def dies_at_step_4(folder, state):
        if state["step"] == 4:
            raise KeyboardInterrupt("killed while saving")
        real(folder, state)

    monkeypatch.setattr(torch_train, "write_training_state", dies_at_step_4)
    cfg = tiny(tmp_path, steps=4, save_every=2, eval_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    model, _ = load(tmp_path / "checkpoint-2")
    assert model.model_config.hidden_size == 64

    monkeypatch.setattr(torch_train, "write_training_state", real)
    assert train(dataclasses.replace(cfg, resume="latest")) == tmp_path / "checkpoint-4"


def test_a_corrupt_checkpoint_gives_a_clear_error(reference, tmp_path):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(reference / "checkpoint-3", folder)
    weights_file = folder / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])
    argv = ["train", "--device", "cpu", *as_argv(tiny(tmp_path)), "--resume"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1
    assert "corrupt" in result.output and str(folder) in result.output, result.output

    shutil.copy2(reference / "checkpoint-3" / "model.safetensors", weights_file)
    for name, garbage, message in [
        ("optimizer.pt", b"garbage", "optimizer.pt is damaged"),
        ("rng_state.pth", b"garbage", "rng_state.pth is damaged"),
        ("trainer_state.json", b"{not json", "trainer_state.json is damaged"),
        (
            "trainer_state.json",
            b'{"global_step": -5}',
            "global_step -5, training_state.json step 3",
        ),
    ]:
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(garbage)
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 1 and message in result.output, (name, result.output)
        assert str(folder) in result.output
        (folder / name).write_bytes(original)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = torch_model.linear_cross_entropy

    def nan_at_step_3(*args):
        loss = real(*args)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch_model, "linear_cross_entropy", nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match="nan at step 3") as info:
        train(tiny(tmp_path, steps=4, save_every=2, eval_every=0))
    assert str(tmp_path / "checkpoint-2") in str(info.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_the_trainer_trains_each_position_on_the_next_token(tmp_path, monkeypatch):
    """The Trainer's micro-batch reaches the model as input_ids = ids[:, :-1] and shift_labels
    = ids[:, 1:] of the stream's block (the seed trained on unshifted labels)."""
    seen = []
    real_forward = torch_model.CustomLLM.forward

    def forward(model, input_ids=None, **kwargs):
        if model.training:
            seen.append((input_ids.clone(), kwargs["shift_labels"].clone()))
        return real_forward(model, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(torch_model.CustomLLM, "forward", forward)
    cfg = tiny(tmp_path, steps=1, eval_every=0, save_every=0)
    train(cfg)
    stream = StreamDataset(
        TRAIN_TXT,
        load_tokenizer(TOKENIZER_DIR),
        cfg.seq_len,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        split="train",
    )
    ids = torch.from_numpy(stream.next_batch(cfg.batch_size).astype(np.int64))
    [(inputs, targets)] = seen
    assert torch.equal(inputs, ids[:, :-1]) and torch.equal(targets, ids[:, 1:])


def test_eval_and_samples_run_in_eval_mode(monkeypatch):
    """The held-out loss runs without dropout and without the aux loss (the LM loss of eval
    mode, the same every call), the sample in eval mode; both leave the model training."""
    torch.manual_seed(0)
    dropout = dict(embd_dropout=0.3, attn_dropout=0.3, mlp_dropout=0.3)
    model = torch_model.CustomLLM(ModelConfig.from_preset("tiny", **dropout)).train()
    batches = [np.random.default_rng(0).integers(0, 49152, (2, 17))]
    loss, load = torch_train.evaluate_loss(model, batches, "cpu", contextlib.nullcontext)
    assert model.training
    assert torch_train.evaluate_loss(model, batches, "cpu", contextlib.nullcontext)[0] == loss
    assert load.shape == (2, 7) and load.sum() == 2 * 2 * 2 * 16  # layers x k x B x T
    ids = torch.from_numpy(batches[0])
    with torch.no_grad():
        lm_loss = model.eval()(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).lm_loss
    assert loss == pytest.approx(lm_loss.item(), rel=1e-6)

    modes = []

    def generate(model, *args, **kwargs):
        modes.append(model.training)
        return "sample"

    monkeypatch.setattr(torch_train, "generate", generate)
    model.train()
    assert torch_train.sample_text(model, None, "Once", 4) == "sample"
    assert modes == [False] and model.training


def test_eval_never_reads_training_data(reference, tmp_path, monkeypatch):
    streams = []
    real_init = StreamDataset.__init__

    def spy(self, source, *args, **kwargs):
        real_init(self, source, *args, **kwargs)
        streams.append((self.source.spec, self.split))

    monkeypatch.setattr(StreamDataset, "__init__", spy)
    # default: the held-out split of --data; also starts from a model folder (--init)
    train(tiny(tmp_path / "a", steps=1, eval_every=1, init=str(reference / "checkpoint-6")))
    train_txt, heldout_txt = str(TRAIN_TXT.resolve()), str(HELDOUT_TXT.resolve())  # as specs
    assert streams == [(train_txt, "train"), (train_txt, "heldout")]
    assert [
        r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "eval_loss" in r
    ] == [1]

    streams.clear()
    train(tiny(tmp_path / "b", steps=1, eval_every=1, eval_data=str(HELDOUT_TXT)))
    assert streams == [(train_txt, "train"), (heldout_txt, "all")]


def test_train_is_registered_with_the_same_options(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--preset",
        "--eval-data",
        "--grad-accum",
        "--min-lr",
        "--resume",
        "--keep-last",
        "--sample-every",
        "--plot",
        "--device",
    ):
        assert flag in result.output
    result = CliRunner().invoke(cli, ["train", "--data", "x.txt", "--eval-data", "x.txt"])
    assert result.exit_code == 1 and "training data" in result.output


def test_compile_option_sets_the_trainers_torch_compile(tmp_path):
    cfg = tiny(tmp_path)
    eager = torch_train.training_arguments(cfg, "cpu")
    assert not eager.torch_compile
    default = torch_train.training_arguments(cfg, "cpu", "default")
    assert default.torch_compile and default.torch_compile_mode is None
    graphs = torch_train.training_arguments(cfg, "cpu", "reduce-overhead")
    assert graphs.torch_compile and graphs.torch_compile_mode == "reduce-overhead"
    result = CliRunner().invoke(cli, ["train", "--compile", "fastest"])
    assert result.exit_code == 2 and "reduce-overhead" in result.output


@pytest.mark.slow
def test_compiled_training_matches_eager(reference, tmp_path, monkeypatch):
    """`--compile`: our model goes through torch.compile once, with the same losses and weights
    as the eager run (inductor's fused kernels round differently: close, not equal); its
    checkpoint keys carry no `_orig_mod.` (~2 min)."""
    compiled_models, compile_ = [], torch.compile

    def spy(model, *args, **kwargs):
        compiled_models.append(model)
        return compile_(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    torch_train.run_training(tiny(tmp_path), "cpu", stream=io.StringIO(), compile_mode="default")
    assert [type(m) for m in compiled_models] == [torch_model.CustomLLM]
    compiled, eager = train_losses(tmp_path), train_losses(reference)
    assert compiled.keys() == eager.keys() == set(range(1, 7))
    for step in eager:
        assert math.isclose(compiled[step], eager[step], rel_tol=1e-5), step
    wc, we = weights(tmp_path / "checkpoint-6"), weights(reference / "checkpoint-6")
    assert wc.keys() == we.keys()
    for key in we:
        torch.testing.assert_close(wc[key], we[key], rtol=1e-4, atol=1e-5, msg=key)


# Expert balancing -------------------------------------------------------------------------------
def test_bias_update_evens_expert_loads(tmp_path):
    """Same data, same init: the default balancing (the "solve" bias update) keeps the expert
    loads even where no bias update (the "sign" rule at rate 0) lets them drift (max_vio of the
    worst layer, last 15 of 30 steps: the collapse phase, where the hidden states look alike); the twin of the MLX test."""
    vio = {}
    for name, change in (("off", dict(bias_update="sign", bias_update_rate=0.0)), ("on", {})):
        config = tmp_path / f"{name}.json"
        ModelConfig.from_preset("tiny", **change).to_json(config)
        out = tmp_path / name
        train(tiny(out, config=str(config), batch_size=4, steps=30, eval_every=0, save_every=0))
        records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        vio[name] = sum(r["max_vio"] for r in records[-15:]) / 15
        bias = weights(latest_checkpoint(out))["decoder_layers.0.mlp.expert_bias"]
        assert (bias.abs().sum() > 0) == (name == "on")
    assert vio["on"] < vio["off"] - 0.5, vio


# Longer runs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_longer_run_learns_the_builtin_stories(tmp_path):
    """The built-in stories and their tokenizer: 3 nats in 150 steps needs simple English (the
    test text, Python's help topics, falls by 1.5); evaluated on the held-out stories."""
    cfg = tiny(tmp_path, seq_len=64, batch_size=4, steps=150, warmup_steps=10, eval_every=75,
               eval_steps=4, save_every=75, keep_last=1, data="builtin", tokenizer="builtin")  # fmt: skip
    train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 3.0
    assert len(evals) == 2 and evals[1] < evals[0] < losses[0] - 3.0
    assert [s for s, _ in list_checkpoints(tmp_path)] == [150]


@pytest.mark.slow
def test_two_data_parallel_ranks_resume_exactly(tmp_path):
    """torchrun, 2 CPU ranks (gloo): loads and losses reduced over ranks, per-rank data state."""
    import socket

    def torchrun(cfg: TrainConfig) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(port), "-m", "customllm_torch.cli", "train", "--device",
                "cpu", *as_argv(cfg)]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    full = tiny(tmp_path / "full", steps=4, save_every=2, eval_every=2)
    torchrun(full)
    state = read_training_state(tmp_path / "full" / "checkpoint-4")
    assert state["world_size"] == 2 and [d["rank"] for d in state["data_state"]] == [0, 1]
    assert state["tokens_seen"] == 4 * 2 * 32 * 2
    torchrun(tiny(tmp_path / "resumed", steps=4, resume=str(tmp_path / "full" / "checkpoint-2")))
    assert train_losses(tmp_path / "resumed") == {
        s: v for s, v in train_losses(tmp_path / "full").items() if s > 2
    }
    assert_same_weights(tmp_path / "resumed" / "checkpoint-4", tmp_path / "full" / "checkpoint-4")


# A run never saves a broken model and owns its --out -------------------------------------------
def test_a_diverging_run_never_saves_a_non_finite_checkpoint(tmp_path):
    """The twin of the MLX test: --lr 1e6 stops at the first non-finite loss, gradient norm or
    weight, and every checkpoint left holds finite weights."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny(out, steps=30, lr=1e6, warmup_steps=1, save_every=1, keep_last=1,
                   eval_every=0))  # fmt: skip
    left = sorted(out.glob("checkpoint-*"))
    assert len(left) <= 1
    for folder in left:
        assert folder.name in str(err.value)
        assert all(torch.isfinite(w).all() for w in weights(folder).values()), folder


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight_decay=float("nan")), "--weight-decay must be a finite number"),
        (dict(max_grad_norm=float("nan")), "--max-grad-norm must be a finite number"),
        (dict(max_sample_tokens=0), "--max-sample-tokens must be positive"),
        (dict(batch_size=100_000_000), r"--batch-size 100000000 x --seq-len \d+ needs at least"),
    ],
)
def test_options_that_would_break_the_run_are_refused_at_start(tmp_path, change, message):
    with pytest.raises(TrainingError, match=message):
        train(tiny(tmp_path / "run", **change))


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    from customllm.runs import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(TrainingError, match="in use by another training run"):
            train(tiny(out, steps=1, eval_every=0, save_every=0))
    assert train(tiny(out, steps=1, eval_every=0, save_every=0)) == out / "checkpoint-1"


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import collections

    import customllm.runs as runs

    out = tmp_path / "run"
    train(tiny(out, steps=1, eval_every=0, save_every=0))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(TrainingError, match="not enough disk space for checkpoint-2.*checkpoint-1"):
        train(tiny(out, steps=2, eval_every=0, save_every=1, resume="latest"))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


def test_the_dense_baseline_trains_from_a_config_file(tmp_path):
    """`n_routed_experts: 0` through the Trainer: no router, no bias, no MaxVio in the records;
    the checkpoint holds the dense layout and the loss falls."""
    config = tmp_path / "dense.json"
    ModelConfig.from_preset("tiny", n_routed_experts=0, intermediate_size=384).to_json(config)
    out = tmp_path / "run"
    train(tiny(out, config=str(config), preset=None, steps=20, lr=1e-2, eval_every=0,
               save_every=0))  # fmt: skip
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["max_vio"] is None for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    keys = set(weights(out / "checkpoint-20"))
    assert not any("router" in k or "routed" in k or "expert_bias" in k for k in keys)


def test_gradient_checkpointing_trains_the_same_weights(dropout_run, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes each layer in the backward pass, dropout masks
    included (torch replays the RNG): the same run as without."""
    config, reference_run = dropout_run
    enabled = []
    name = "activation_checkpointing_enable"  # transformers 5.x; gradient_... before
    name = name if hasattr(torch_model.CustomLLM, name) else "gradient_checkpointing_enable"
    real_enable = getattr(torch_model.CustomLLM, name)
    monkeypatch.setattr(
        torch_model.CustomLLM,
        name,
        lambda self, *a, **kw: enabled.append(1) or real_enable(self, *a, **kw),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated TrainingArguments
        last = train(tiny(tmp_path, config=config, gradient_checkpointing=True))
    assert enabled  # the Trainer turned it on
    assert train_losses(tmp_path) == pytest.approx(train_losses(reference_run), rel=1e-6)
    for key, value in weights(reference_run / "checkpoint-6").items():
        torch.testing.assert_close(weights(last)[key], value, atol=1e-6, rtol=1e-5, msg=key)
