"""customllm.training: options, schedule, checkpoint folders, metrics, signals (no framework)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from customllm.checkpoint import canonical_shapes
from customllm.config import ModelConfig
from customllm.metrics import (
    EVAL_RECORD_KEYS,
    TRAIN_RECORD_KEYS,
    MetricsLogger,
    max_vio,
    plot_metrics,
    read_metrics,
)
from customllm.runs import (
    CheckpointError,
    TrainingError,
    check_new_run,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    removed_if_empty,
    resolve_resume,
    rotate_checkpoints,
    write_training_state,
)
from customllm.training import (
    NonFiniteLossError,
    StopSignal,
    TrainConfig,
    check_finite,
    check_model_fits,
    check_resume,
    config_differences,
    decays,
    lr_at,
    new_model_config,
    tokenizer_source,
    train_options,
)

REPO_DIR = Path(__file__).resolve().parents[1]


# Options ----------------------------------------------------------------------------------------
def test_min_lr_defaults_to_a_tenth_of_lr():
    assert TrainConfig(lr=2e-3).min_lr == pytest.approx(2e-4)
    assert TrainConfig(lr=2e-3, min_lr=0.0).min_lr == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(config="c.json", init="m"), "at most one"),
        (dict(preset="tiny", init="m"), "at most one of --preset NAME and --init"),
        (dict(eval_data="e.txt", eval_every=0), "--eval-every 0 turns evaluation off"),
        (dict(preset="tiny", config="c.json"), "at most one of --preset NAME and --config"),
        (dict(preset="huge"), "unknown preset"),
        (dict(seq_len=0), "--seq-len"),
        (dict(keep_last=-1), "--keep-last"),
        (dict(lr=1e-3, min_lr=1e-2), "--min-lr"),
        (dict(dtype="float16"), "--dtype"),
        (dict(data="a.txt", eval_data="a.txt"), "training data"),
    ],
)
def test_bad_options_raise_a_clear_error(kwargs, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(**kwargs)


def test_default_data_depends_on_the_model_size():
    from customllm.corpus import BUILTIN
    from customllm.data import DEFAULT_HUB_DATA

    assert TrainConfig(preset="tiny").train_data() == BUILTIN
    assert TrainConfig(preset="small").train_data() == BUILTIN
    assert TrainConfig(preset="973m").train_data() == DEFAULT_HUB_DATA
    assert TrainConfig(preset="973m", data="x.txt").train_data() == "x.txt"


def test_config_round_trips_through_a_dict():
    cfg = TrainConfig(preset="tiny", lr=3e-3, resume="latest")
    assert TrainConfig.from_dict({**cfg.to_dict(), "not_an_option": 1}) == cfg


def test_a_config_written_before_embedding_init_std_keeps_its_init(tmp_path):
    """A complete config.json without `embedding_init_std` loads (from_json checks that every
    field is there) with the 0.02 its token embeddings were drawn with; new and partial
    configs take the default 1.0."""
    old = ModelConfig.from_preset("tiny").to_dict()
    del old["embedding_init_std"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert ModelConfig.from_json(path).embedding_init_std == 0.02
    assert ModelConfig.from_preset("tiny").embedding_init_std == 1.0
    assert ModelConfig.from_dict({"rope_theta": 1e4}).embedding_init_std == 1.0
    with pytest.raises(ValueError, match="embedding_init_std must be positive"):
        ModelConfig.from_preset("tiny", embedding_init_std=0.0)


def test_a_config_written_before_the_balancing_fields_keeps_its_rule():
    """A complete config.json without `bias_update` / `router_lr_scale` (as written before they
    existed) loads with the rule it was trained with: the sign step and the router at the
    full lr. A new config, and a partial one, take the current defaults."""
    old = ModelConfig.from_preset("tiny").to_dict()
    del old["bias_update"], old["router_lr_scale"]
    old["bias_update_rate"] = 1e-3
    config = ModelConfig.from_dict(old)
    assert (config.bias_update, config.bias_update_rate, config.router_lr_scale) == (
        "sign",
        1e-3,
        1.0,
    )
    assert ModelConfig.from_dict(config.to_dict()) == config  # and it is written out explicitly
    new = ModelConfig.from_preset("tiny")
    assert (new.bias_update, new.bias_update_rate, new.router_lr_scale) == ("solve", 0.2, 0.03)
    assert (
        ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 2}).bias_update == "solve"
    )
    with pytest.raises(ValueError, match="bias_update_rate must be in"):
        ModelConfig.from_preset("tiny", bias_update_rate=1.5)
    with pytest.raises(ValueError, match="router_lr_scale must be positive"):
        ModelConfig.from_preset("tiny", router_lr_scale=float("inf"))
    with pytest.raises(ValueError, match="routed_scaling_factor must be positive"):
        ModelConfig.from_preset("tiny", routed_scaling_factor=float("inf"))


def _parse(*argv: str) -> TrainConfig:
    seen = {}

    @click.command()
    @train_options
    def cmd(**options):
        seen["cfg"] = TrainConfig.from_dict(options)

    result = CliRunner().invoke(cmd, list(argv))
    assert result.exit_code == 0, result.output
    return seen["cfg"]


def test_train_options_cover_every_field_with_the_dataclass_defaults():
    assert _parse() == TrainConfig()
    cfg = _parse("--preset", "tiny", "--seq-len", "32", "--eval-data", "e.txt", "--plot")
    assert (cfg.preset, cfg.seq_len, cfg.eval_data, cfg.plot) == ("tiny", 32, "e.txt", True)


def test_resume_flag_alone_means_latest():
    assert _parse("--resume").resume == "latest"
    assert _parse("--resume", "runs/x/checkpoint-5").resume == "runs/x/checkpoint-5"
    assert _parse().resume is None


# Schedule and weight decay ----------------------------------------------------------------------
def test_lr_warmup_is_linear_to_the_peak():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)


def test_lr_cosine_runs_from_peak_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway: the mean of the endpoints
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_lr_without_warmup_starts_at_the_peak():
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-3)


def test_weight_decay_only_on_weight_matrices_other_than_embeddings():
    assert decays("decoder_layers.0.self_attn.q_proj_d.weight", 2)
    assert decays("decoder_layers.0.mlp.switch_mlp.up_proj.weight", 3)
    assert decays("lm_head.weight", 2)
    assert not decays("token_embeddings.weight", 2)
    assert not decays("position_embeddings.weight", 2)
    assert not decays("decoder_layers.0.input_norm.weight", 1)
    assert not decays("lm_head.bias", 1)


# Checkpoint folders -----------------------------------------------------------------------------
def _fake_checkpoint(out: Path, step: int, framework: str = "torch") -> Path:
    folder = checkpoint_dir(out, step)
    folder.mkdir(parents=True)
    config = ModelConfig.from_preset("tiny", vocab_size=16, max_position_embeddings=16)
    config.to_json(folder / "config.json")
    weights = {k: np.zeros(shape, np.float32) for k, shape in canonical_shapes(config).items()}
    save_file(weights, str(folder / "model.safetensors"))
    write_training_state(folder, {"step": step, "framework": framework})
    return folder


def test_checkpoint_listing_is_numeric_and_skips_temp_folders(tmp_path):
    for step in (9, 10, 2):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / ".checkpoint-11.tmp-abc").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoint-7"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_rotate_keeps_the_newest_and_clears_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / ".checkpoint-5.tmp-abc").mkdir()
    rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    rotate_checkpoints(tmp_path, keep_last=0)
    assert len(list_checkpoints(tmp_path)) == 2


def test_resolve_resume_finds_the_latest(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    newest = _fake_checkpoint(tmp_path, 12)
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) == newest
    assert resolve_resume(True, tmp_path) == newest
    assert resolve_resume(str(tmp_path), "elsewhere") == newest  # a run folder
    assert resolve_resume(str(tmp_path / "checkpoint-3"), "elsewhere") == tmp_path / "checkpoint-3"


def test_resolve_resume_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint-N folder"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)
    folder = _fake_checkpoint(tmp_path, 5)
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        resolve_resume(str(folder), tmp_path, required=["optimizer.pt"])
    with pytest.raises(CheckpointError, match="--init"):
        resolve_resume(str(folder), tmp_path, framework="mlx")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "training_state.json").write_text("{not json"), "corrupt"),
        (lambda f: (f / "training_state.json").unlink(), "training_state.json is missing"),
        (lambda f: (f / "config.json").write_text(""), "config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda f: _truncate(f / "model.safetensors", 10), "truncated"),
        (lambda f: _truncate(f / "model.safetensors", 4), "damaged header"),
        # config.json and the weights apart: the torch Trainer would load them non-strictly
        (
            lambda f: _edit_config(f, hidden_size=128, **HEAD_DIMS_DERIVED),
            r"has shape \(16, 64\), the config expects \(16, 128\)",
        ),
        # the stored head dims no longer fit the edited width
        (lambda f: _edit_config(f, hidden_size=128), "qk_nope_head_dim=16 does not match"),
        (lambda f: _edit_config(f, num_hidden_layers=3), "missing tensor 'decoder_layers.2"),
        (lambda f: _edit_config(f, num_hidden_layers=1), "unexpected tensor 'decoder_layers.1"),
        (lambda f: _edit_config(f, router_score="cosine"), "config.json: .*router_score"),
    ],
)
def test_a_damaged_checkpoint_is_named(tmp_path, damage, message):
    folder = _fake_checkpoint(tmp_path, 5)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as info:
        resolve_resume("latest", tmp_path)
    assert str(folder) in str(info.value)


HEAD_DIMS_DERIVED = dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path, keep_bytes_less: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep_bytes_less] if keep_bytes_less > 4 else data[:4])


# Metrics ----------------------------------------------------------------------------------------
def test_max_vio_is_max_over_mean_minus_one_worst_layer_and_mean():
    assert max_vio([[3, 3, 3, 3]]) == (0.0, 0.0, 0)
    assert max_vio(np.array([[2, 2, 2, 2], [4, 0, 0, 0], [3, 1, 2, 2]])) == (3.0, 3.5 / 3, 1)
    assert max_vio([[0, 0, 0]]) == (0.0, 0.0, 0)
    assert max_vio(np.zeros((2, 0))) is None  # a dense model: no experts to balance


def test_a_collapsed_layer_is_warned_about_once_after_5_steps(tmp_path):
    console = io.StringIO()
    log = MetricsLogger(tmp_path, stream=console)
    balanced, collapsed = [1, 1, 1, 1], [4, 0, 0, 0]  # max/mean 4
    for step in range(1, 12):
        log.log_train(
            step, 1.0, 1.0, 1e-3, 1.0, 0.0, [balanced, collapsed if step != 3 else balanced]
        )
    warnings = [line for line in console.getvalue().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step 8: the experts of layer 1 have collapsed" in warnings[0]


def test_metrics_records_have_exactly_the_keys(tmp_path):
    console = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=10, stream=console)
    log.log_train(1, 5.0, 0.5, 1e-3, 1234.0, 0.25, [[1, 3], [2, 2]])
    log.log_eval(1, 2.0, [[10, 30], [30, 10]])
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert tuple(records[0]) == TRAIN_RECORD_KEYS
    assert records[0]["max_vio"] == 0.5 and records[0]["max_vio_mean"] == 0.25
    assert records[0]["max_vio_layer"] == 0
    assert tuple(records[1]) == EVAL_RECORD_KEYS
    assert records[1]["eval_ppl"] == pytest.approx(math.exp(2.0))
    assert records[1]["eval_max_vio"] == 0.5
    text = console.getvalue()
    assert "step 1/10" in text and "loss 5.0000" in text and "1,234 tok/s" in text
    assert "max_vio 0.50 (layer 0), mean 0.25" in text and "eval_loss 2.0000" in text


def test_metrics_console_every_n_steps_and_progress_bar_on_a_tty(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    console = Tty()
    log = MetricsLogger(tmp_path, total_steps=4, log_every=2, stream=console)
    for step in range(1, 5):
        log.log_train(step, 1.0, None, 1e-3, 1.0, 0.0, None)
    log.close()
    text = console.getvalue()
    assert "step 1/4" not in text and "step 2/4" in text and "step 4/4" in text
    assert "\r\033[K[" in text and "4/4" in text
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4


def test_metrics_of_a_resumed_run_drop_the_steps_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, stream=io.StringIO())
    for step in range(1, 6):
        log.log_train(step, 1.0, 1.0, 1e-3, 1.0, 0.0, None)
    log.log_eval(4, 1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('null\n3\n[1, 2]\n{"loss": 1.0}\n{"step": "2"}\n')  # JSON, not records
        f.write('{"step": 6, "lo')  # a line cut by a kill
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 4]
    MetricsLogger(tmp_path, stream=io.StringIO(), resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_plot_refuses_a_file_without_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('null\n{"step": 1}\n')
    with pytest.raises(TrainingError, match="holds no training or evaluation records"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    MetricsLogger(tmp_path, stream=io.StringIO()).log_train(1, 1.0, 1.0, 1e-3, 1.0, 0.0, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TrainingError, match="matplotlib"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = MetricsLogger(tmp_path, stream=io.StringIO())
    for step in range(1, 4):
        log.log_train(step, 3.0 - step, 1.0, 1e-3, 10.0, 0.1, [[1, 2]])
    log.log_eval(3, 1.5)
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_script_gives_a_clear_error_or_a_png(tmp_path):
    MetricsLogger(tmp_path, stream=io.StringIO()).log_train(1, 1.0, 1.0, 1e-3, 1.0, 0.0, None)
    script = REPO_DIR / "scripts" / "plot_metrics.py"
    png = tmp_path / "out.png"
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "metrics.jsonl"), "--out", str(png)],
        capture_output=True,
        text=True,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert run.returncode == 1 and "matplotlib" in run.stderr
    else:
        assert run.returncode == 0 and png.is_file()


# Stopping ---------------------------------------------------------------------------------------
def test_sigterm_only_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_sigint_interrupts_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    check_finite(3.5, 1, tmp_path)
    folder = _fake_checkpoint(tmp_path, 20)
    with pytest.raises(NonFiniteLossError, match="nan at step 27") as info:
        check_finite(float("nan"), 27, tmp_path)
    assert str(folder) in str(info.value)
    with pytest.raises(NonFiniteLossError, match="grad_norm is inf at step 2"):
        check_finite(float("inf"), 2, what="grad_norm")


def test_config_differences_lists_changed_options():
    saved = TrainConfig(lr=1e-3).to_dict()
    assert config_differences(saved, TrainConfig(lr=1e-3, out="elsewhere")) == []
    assert config_differences(saved, TrainConfig(lr=2e-3, min_lr=1e-4)) == ["--lr 0.001 -> 0.002"]
    assert json.loads(json.dumps(saved)) == saved  # JSON-safe for training_state.json


def test_config_differences_compare_data_sources_as_what_they_name(tmp_path, monkeypatch):
    """A relative and an absolute path to one file, or no --data and the default source, are
    the same data (a resume with either was refused)."""
    (tmp_path / "d.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(preset="tiny", data="d.txt").to_dict()
    assert config_differences(saved, TrainConfig(preset="tiny", data=str(tmp_path / "d.txt"))) == []
    assert config_differences(TrainConfig().to_dict(), TrainConfig(data="builtin")) == []
    assert config_differences(saved, TrainConfig(preset="tiny", data="builtin")) == [
        "--data 'd.txt' -> 'builtin'"
    ]
    hub = TrainConfig(preset="973m").to_dict()
    assert config_differences(hub, TrainConfig(preset="973m", data="builtin")) != []


def test_a_new_run_never_writes_over_another_runs_checkpoints(tmp_path):
    check_new_run(tmp_path / "missing")  # nothing there yet: fine
    checkpoint_dir(tmp_path, 7).mkdir(parents=True)
    with pytest.raises(TrainingError, match="checkpoint-7.*--resume"):
        check_new_run(tmp_path)
    write_training_state(checkpoint_dir(tmp_path, 7), {"step": 7})
    check_new_run(tmp_path, resume=checkpoint_dir(tmp_path, 7))  # continues its own run
    checkpoint_dir(tmp_path, 9).mkdir()
    write_training_state(checkpoint_dir(tmp_path, 9), {"step": 9})
    with pytest.raises(TrainingError, match=r"later checkpoints of the run \(checkpoint-9\)"):
        check_new_run(tmp_path, resume=checkpoint_dir(tmp_path, 7))
    check_new_run(tmp_path, resume=checkpoint_dir(tmp_path, 9))
    elsewhere = checkpoint_dir(tmp_path / "other", 2)
    with pytest.raises(TrainingError, match="another run \\(checkpoint-9\\).*resume there"):
        check_new_run(tmp_path, resume=elsewhere)
    check_new_run(tmp_path / "fresh", resume=elsewhere)  # no checkpoints there: fine


def test_a_failed_run_leaves_no_empty_out_it_made(tmp_path):
    """The torch Trainer makes --out up front: a run that fails on its data removed nothing."""
    for out, made in ((tmp_path / "new", True), (tmp_path / "kept", False)):
        if not made:
            out.mkdir()
        with pytest.raises(ValueError), removed_if_empty(out):
            out.mkdir(exist_ok=True)
            raise ValueError("empty corpus")
        assert out.exists() is not made
    with pytest.raises(ValueError), removed_if_empty(tmp_path / "used"):
        checkpoint_dir(tmp_path / "used", 1).mkdir(parents=True)
        raise ValueError("later")
    assert checkpoint_dir(tmp_path / "used", 1).is_dir()  # not empty: kept
    log = MetricsLogger(tmp_path / "lazy", stream=io.StringIO())
    assert not (tmp_path / "lazy").exists()  # made with the first record
    log.log_train(1, 1.0, 1.0, 1e-3, 1.0, 0.0, None)
    assert len(read_metrics(tmp_path / "lazy" / "metrics.jsonl")) == 1


def test_resume_refuses_options_that_change_the_numbers(tmp_path):
    saved = TrainConfig(lr=1e-3, steps=10).to_dict()
    state = {"world_size": 1, "data_state": [{}], "train_config": saved}
    check_resume(state, tmp_path, TrainConfig(lr=1e-3, steps=20), 1)  # more steps: allowed
    with pytest.raises(TrainingError, match="lr"):
        check_resume(state, tmp_path, TrainConfig(lr=1e-2, steps=10), 1)
    with pytest.raises(TrainingError, match="2 data-parallel ranks"):
        check_resume({**state, "world_size": 2}, tmp_path, TrainConfig(lr=1e-3, steps=10), 1)
    with pytest.raises(CheckpointError, match="rng_state"):
        check_resume(state, tmp_path, TrainConfig(lr=1e-3), 1, ("rng_state",))


def test_resume_keeps_the_checkpoints_model_and_refuses_another(tmp_path):
    """The model of a resumed run is its checkpoint's: --preset/--config/--init left out take
    the checkpoint run's (no "option changed" warning for options never given); given and
    naming another model, an error (it trained the checkpoint's model under a warning)."""

    def state(**saved):
        return {"world_size": 1, "data_state": [{}], "train_config": TrainConfig(**saved).to_dict()}

    tiny = state(preset="tiny")
    cfg = TrainConfig()
    check_resume(tiny, tmp_path, cfg, 1)
    assert (cfg.preset, cfg.model_preset) == ("tiny", "tiny")
    assert config_differences(tiny["train_config"], cfg) == []
    check_resume(tiny, tmp_path, TrainConfig(preset="tiny"), 1)  # the same command line
    with pytest.raises(TrainingError, match="--preset 'tiny'.*--preset 'small' would not"):
        check_resume(tiny, tmp_path, TrainConfig(preset="small"), 1)
    with pytest.raises(TrainingError, match="--config 'h128.json' would not change it"):
        check_resume(tiny, tmp_path, TrainConfig(config="h128.json"), 1)
    check_resume(state(), tmp_path, TrainConfig(preset="small"), 1)  # the default, named

    init = state(init="runs/a/checkpoint-9")
    check_resume(init, tmp_path, TrainConfig(init="runs/a/checkpoint-9"), 1)
    with pytest.raises(TrainingError, match="had --init 'runs/a/checkpoint-9'"):
        check_resume(init, tmp_path, TrainConfig(preset="tiny"), 1)
    # runs before the default was None saved preset "small" beside their --config
    old = {
        **state(config="c.json"),
        "train_config": {**TrainConfig(config="c.json").to_dict(), "preset": "small"},
    }
    check_resume(old, tmp_path, TrainConfig(config="c.json"), 1)
    with pytest.raises(TrainingError, match="--preset 'small' would not"):
        check_resume(old, tmp_path, TrainConfig(preset="small"), 1)


def test_new_model_config_takes_the_tokenizers_vocabulary_for_small_presets(tmp_path):
    class FakeTokenizer:
        eos_token_id, bos_token_id = 3, 1

        def __len__(self):
            return 8000

    tiny = new_model_config(TrainConfig(preset="tiny"), FakeTokenizer())
    assert (tiny.vocab_size, tiny.eos_token_id, tiny.bos_token_id) == (8000, 3, 1)
    assert new_model_config(TrainConfig(preset="973m"), FakeTokenizer()).vocab_size == 49152
    check_model_fits(tiny, FakeTokenizer(), 512)
    with pytest.raises(TrainingError, match="exceeds the model's context of 512"):
        check_model_fits(tiny, FakeTokenizer(), 513)
    small_vocab = dataclasses.replace(tiny, vocab_size=100)
    with pytest.raises(TrainingError, match="8000 tokens, more than the model's vocab_size 100"):
        check_model_fits(small_vocab, FakeTokenizer(), 64)


def test_a_damaged_training_state_is_named(tmp_path):
    """A negative or zero step (which trained with negative learning rates), or fields of the
    wrong kind: a CheckpointError naming the file, before anything trains."""
    from customllm.runs import CheckpointError, read_training_state

    state = tmp_path / "training_state.json"
    for bad, message in (
        ({"step": -5}, "says step -5"),
        ({"step": 0}, "says step 0"),
        ({"step": 3, "data_state": "x"}, "field 'data_state' is str, not list"),
        ({"step": 3, "tokens_seen": "many"}, "field 'tokens_seen' is str"),
        ({"step": "3"}, "has no integer 'step'"),
    ):
        state.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"training_state.json.*{message}|{message}"):
            read_training_state(tmp_path)
    state.write_text(json.dumps({"step": 3, "data_state": [], "tokens_seen": 96}))
    assert read_training_state(tmp_path)["step"] == 3


def test_a_batch_that_cannot_fit_is_refused_naming_the_size_that_does():
    from customllm.training import check_batch_fits

    config = ModelConfig.from_preset("tiny")
    gib = 2**30
    check_batch_fits(config, 8, 256, 1 * gib)  # the tiny preset's batch fits in 1 GiB
    check_batch_fits(config, 10**9, 256, None)  # unknown memory: nothing to compare
    with pytest.raises(TrainingError, match=r"at most --batch-size (\d+) fits") as err:
        check_batch_fits(config, 100_000_000, 32, 1 * gib)
    fits = int(re.search(r"at most --batch-size (\d+)", str(err.value)).group(1))
    check_batch_fits(config, fits, 32, 1 * gib)
    with pytest.raises(TrainingError):
        check_batch_fits(config, fits + 1, 32, 1 * gib)
    with pytest.raises(TrainingError, match="the model alone does not fit"):
        check_batch_fits(ModelConfig.from_preset("973m"), 1, 32, 1 * gib)


def test_default_tokenizer_follows_the_data(tmp_path):
    """The built-in stories get the built-in tokenizer (no download); other data cosmo2; a
    --resume or --init folder its own tokenizer; --tokenizer always wins."""
    assert tokenizer_source(TrainConfig(preset="tiny"), None) == "builtin"
    assert tokenizer_source(TrainConfig(preset="small", data="builtin"), None) == "builtin"
    assert tokenizer_source(TrainConfig(preset="973m"), None) == "HuggingFaceTB/cosmo2-tokenizer"
    assert tokenizer_source(TrainConfig(data="d.txt"), None) == "HuggingFaceTB/cosmo2-tokenizer"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_source(TrainConfig(preset="tiny"), tmp_path) == str(tmp_path)
    assert tokenizer_source(TrainConfig(preset="tiny", tokenizer="t"), tmp_path) == "t"
