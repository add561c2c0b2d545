"""MLX against the PyTorch reference on the same weights, and the folder converters between them."""

# ruff: noqa: E402  (customllm_mlx must be imported before mlx.core: it preloads OpenBLAS)

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

customllm_mlx = pytest.importorskip("customllm_mlx")  # first: preloads OpenBLAS before mlx.core
torch = pytest.importorskip("torch")

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from click.testing import CliRunner
from conftest import HELDOUT_TXT, TOKENIZER_DIR, TOKENIZER_VOCAB_SIZE, TRAIN_TXT
from mlx.utils import tree_flatten
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import customllm_torch
from customllm.checkpoint import CONFIG_NAME, WEIGHTS_NAME, unstack_experts
from customllm.config import ModelConfig
from customllm.convert import convert_folder
from customllm.data import StreamDataset
from customllm_mlx.model import CustomLLM as MLXModel
from customllm_mlx.model import causal_lm_loss
from customllm_torch.model import CustomLLM as TorchModel
from customllm_torch.model import LatentKVCache

torch.set_num_threads(min(4, torch.get_num_threads()))
REPO_DIR = Path(__file__).resolve().parents[1]
CONVERT_DIR = REPO_DIR / "convert"


def load_script(name: str):
    """A convert/ script as a module (its click command is `main`)."""
    spec = importlib.util.spec_from_file_location(f"convert_{name}", CONVERT_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_to_mlx = load_script("torch_to_mlx")
mlx_to_torch = load_script("mlx_to_torch")


def run_script(module, *args: str) -> str:
    result = CliRunner().invoke(module.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def torch_model(config: ModelConfig, seed: int = 0, bias_std: float = 0.05) -> TorchModel:
    """A torch model with a non-zero routing bias (so the bias path is exercised)."""
    torch.manual_seed(seed)
    model = TorchModel(config)
    with torch.no_grad():
        for layer in model.decoder_layers:
            if config.n_routed_experts:
                layer.mlp.expert_bias.normal_(0.0, bias_std)
    return model.eval()


def mlx_copy(model: TorchModel) -> MLXModel:
    """An MLX model holding exactly the torch model's weights (canonical keys -> stacked)."""
    weights = {k: mx.array(v.detach().numpy()) for k, v in model.state_dict().items()}
    twin = MLXModel(model.model_config)
    twin.load_weights(list(twin.sanitize(weights).items()), strict=True)
    mx.eval(twin.parameters())
    return twin.eval()


@pytest.fixture(scope="module")
def text_ids(tokenizer_dir) -> np.ndarray:
    """Real text: the start of the held-out test text, tokenized with the test tokenizer,
    (4, 64)."""
    from customllm.tokenizer import load_tokenizer

    text = HELDOUT_TXT.read_text(encoding="utf-8")[:20_000]
    ids = load_tokenizer(tokenizer_dir)(text)["input_ids"]
    return np.array(ids[: 4 * 64], dtype=np.int64).reshape(4, 64)


def tokenizer_config(preset: str) -> ModelConfig:
    return ModelConfig.from_preset(preset, vocab_size=TOKENIZER_VOCAB_SIZE)


# --- Same weights, same numbers ---------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_logits_match_on_real_text(preset, text_ids):
    ids = text_ids if preset == "tiny" else text_ids[:2]
    model = torch_model(tokenizer_config(preset))
    twin = mlx_copy(model)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    got = np.array(twin(mx.array(ids)))
    assert got.shape == expected.shape == (*ids.shape, TOKENIZER_VOCAB_SIZE)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    for layer in twin.decoder_layers:  # the routing bias really changes routing
        layer.mlp.expert_bias = mx.zeros_like(layer.mlp.expert_bias)
    assert np.abs(np.array(twin(mx.array(ids))) - expected).max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_loss_and_gradients_match(preset, text_ids):
    config = tokenizer_config(preset)
    assert config.embd_dropout == config.attn_dropout == config.mlp_dropout == 0.0
    ids = text_ids[:2, :48]
    model = torch_model(config).train()
    twin = mlx_copy(model).train()

    out = model(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()
    torch_grads = {  # an expert no token chose has no torch grad; MLX gives it zeros
        k: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
        for k, p in model.named_parameters()
    }

    def loss_fn(m, inputs):
        logits, aux_loss, _ = m(inputs, return_aux=True)
        return causal_lm_loss(logits, inputs) + aux_loss

    loss, grads = nn.value_and_grad(twin, loss_fn)(twin, mx.array(ids))
    mlx_grads = {k: np.array(v) for k, v in unstack_experts(dict(tree_flatten(grads))).items()}

    assert out.aux_loss.item() > 0
    assert abs(loss.item() - out.loss.item()) <= 1e-4 * out.loss.item()
    assert set(mlx_grads) == set(torch_grads)  # expert_bias is a gradient in neither
    assert not any(k.endswith("expert_bias") for k in mlx_grads)
    for key, expected in torch_grads.items():
        err = np.linalg.norm(mlx_grads[key] - expected)
        assert err <= 1e-4 * np.linalg.norm(expected) + 1e-10, key
    assert np.linalg.norm(torch_grads["decoder_layers.0.mlp.router.weight"]) > 0


def test_greedy_decoding_gives_identical_tokens(text_ids):
    model = torch_model(tokenizer_config("tiny"))
    twin = mlx_copy(model)
    prompt = text_ids[:1, :16]

    with torch.no_grad():
        cache = LatentKVCache(len(model.decoder_layers))
        logits = model(torch.from_numpy(prompt), cache=cache, use_cache=True).logits
        torch_tokens = []
        for _ in range(32):
            token = logits[:, -1].argmax(-1, keepdim=True)
            torch_tokens.append(int(token))
            logits = model(token, cache=cache, use_cache=True).logits

    cache = twin.make_cache()
    logits = twin(mx.array(prompt), cache=cache)
    mlx_tokens = []
    for _ in range(32):
        token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        mlx_tokens.append(token.item())
        logits = twin(token, cache=cache)

    assert mlx_tokens == torch_tokens
    assert cache[0].offset == 16 + 32
    assert len(set(torch_tokens)) > 1


# --- Converters -------------------------------------------------------------------------------


def tiny_torch_folder(tmp_path: Path, tokenizer_dir: Path | None = None) -> Path:
    vocab = (
        256 if tokenizer_dir is None else TOKENIZER_VOCAB_SIZE
    )  # the tokenizer's, when the folder has one
    config = ModelConfig.from_preset("tiny", vocab_size=vocab, max_position_embeddings=64)
    return customllm_torch.save(torch_model(config), tmp_path / "torch", tokenizer=tokenizer_dir)


def assert_same_tensors(a: Path, b: Path) -> None:
    """Bit-identical tensors (same keys, dtypes, shapes and bytes)."""
    ta, tb = load_torch(str(a / WEIGHTS_NAME)), load_torch(str(b / WEIGHTS_NAME))
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        assert torch.equal(ta[key].view(torch.uint8), tb[key].view(torch.uint8)), key


def test_torch_to_mlx_to_torch_is_bit_identical(tmp_path, tokenizer_dir):
    src = tiny_torch_folder(tmp_path, tokenizer_dir)
    output = run_script(torch_to_mlx, "--src", src, "--dst", tmp_path / "mlx", "--verify")
    assert "verify: max |logits torch(src) - logits mlx(dst)|" in output
    run_script(mlx_to_torch, "--src", tmp_path / "mlx", "--dst", tmp_path / "back")
    assert_same_tensors(src, tmp_path / "mlx")
    assert_same_tensors(src, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    model, _ = customllm_torch.load(tmp_path / "back")
    original, _ = customllm_torch.load(src)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mlx_to_torch_to_mlx_is_bit_identical(tmp_path):
    config = ModelConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=64)
    mx.random.seed(3)
    model = MLXModel(config)
    for layer in model.decoder_layers:
        layer.mlp.expert_bias = 0.05 * mx.random.normal(layer.mlp.expert_bias.shape)
    src = customllm_mlx.save(model, tmp_path / "mlx")
    run_script(mlx_to_torch, "--src", src, "--dst", tmp_path / "torch")
    run_script(torch_to_mlx, "--src", tmp_path / "torch", "--dst", tmp_path / "back")
    assert_same_tensors(src, tmp_path / "back")
    loaded, _ = customllm_mlx.load(tmp_path / "back")
    for key, value in tree_flatten(model.parameters()):
        assert mx.array_equal(dict(tree_flatten(loaded.parameters()))[key], value), key


def test_bfloat16_conversion_rounds_like_torch_and_stays_close(tmp_path):
    src = tiny_torch_folder(tmp_path)
    output = run_script(
        mlx_to_torch, "--src", src, "--dst", tmp_path / "bf16", "--dtype", "bfloat16", "--verify"
    )
    assert "verify: max" in output
    full, half = (
        load_torch(str(src / WEIGHTS_NAME)),
        load_torch(str(tmp_path / "bf16" / WEIGHTS_NAME)),
    )
    for key, value in full.items():
        if key.endswith("expert_bias"):
            assert half[key].dtype == torch.float32 and torch.equal(half[key], value), key
        else:  # round-to-nearest-even, bit for bit as torch casts
            assert half[key].dtype == torch.bfloat16, key
            assert torch.equal(half[key], value.to(torch.bfloat16)), key

    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    reference, _ = customllm_torch.load(src)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    mlx_half, _ = customllm_mlx.load(tmp_path / "bf16")
    assert mlx_half.lm_head.weight.dtype == mx.bfloat16
    assert mlx_half.decoder_layers[0].mlp.expert_bias.dtype == mx.float32
    # MLX's CPU gather_mm is float32-only: run the bf16 weights widened there, as stored on GPU
    dtype = None if mx.metal.is_available() else "float32"
    mlx_half, _ = customllm_mlx.load(tmp_path / "bf16", dtype=dtype)
    got = np.array(mlx_half(mx.array(ids)).astype(mx.float32))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()

    # and back to float32: bf16 widens exactly
    run_script(torch_to_mlx, "--src", tmp_path / "bf16", "--dst", tmp_path / "f32")
    back = load_torch(str(tmp_path / "f32" / WEIGHTS_NAME))
    for key, value in half.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], value.float()), key


def test_trainer_checkpoint_with_wrapper_prefixes_converts(tmp_path, tokenizer_dir):
    """A `checkpoint-N/` written by transformers (save_pretrained), keys prefixed as
    torch.compile and DDP leave them, beside optimizer and trainer state files."""
    config = ModelConfig.from_preset(
        "tiny", vocab_size=TOKENIZER_VOCAB_SIZE, max_position_embeddings=64
    )
    model = torch_model(config)
    ckpt = tmp_path / "run" / "checkpoint-100"
    model.save_pretrained(str(ckpt))
    hf_config = json.loads((ckpt / CONFIG_NAME).read_text())
    assert "transformers_version" in hf_config and hf_config.get("dtype") == "float32"
    weights = load_torch(str(ckpt / WEIGHTS_NAME))
    prefixes = ["_orig_mod.", "module.", "module._orig_mod."]
    weights = {prefixes[i % 3] + k: v for i, (k, v) in enumerate(weights.items())}
    save_torch(weights, str(ckpt / WEIGHTS_NAME), metadata={"format": "pt"})
    (ckpt / "trainer_state.json").write_text("{}")
    torch.save({}, ckpt / "optimizer.pt")
    shutil.copy(tokenizer_dir / "tokenizer.json", ckpt / "tokenizer.json")

    run_script(torch_to_mlx, "--src", ckpt, "--dst", tmp_path / "mlx", "--dtype", "bfloat16")
    written = load_torch(str(tmp_path / "mlx" / WEIGHTS_NAME))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in written)
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == [
        "config.json",
        "customllm_mlx_lm.py",
        "model.safetensors",
        "tokenizer.json",
    ]
    new_config = json.loads((tmp_path / "mlx" / CONFIG_NAME).read_text())
    assert new_config["dtype"] == "bfloat16" and new_config["model_type"] == "customllm"

    ids = np.random.default_rng(1).integers(0, 256, size=(1, 16))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    converted, _ = customllm_mlx.load(tmp_path / "mlx", dtype="float32")
    got = np.array(converted(mx.array(ids)))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_stacked_expert_folder_converts_to_canonical(tmp_path):
    src = tiny_torch_folder(tmp_path)
    weights = load_numpy(str(src / WEIGHTS_NAME))
    config = ModelConfig.from_json(src)
    stacked = MLXModel(config).sanitize({k: mx.array(v) for k, v in weights.items()})
    mx.save_safetensors(str(src / WEIGHTS_NAME), stacked)
    assert "decoder_layers.0.mlp.routed_experts.gate_proj.weight" in load_numpy(
        str(src / WEIGHTS_NAME)
    )
    convert_folder(src, tmp_path / "canonical")
    converted = load_numpy(str(tmp_path / "canonical" / WEIGHTS_NAME))
    assert sorted(converted) == sorted(weights) and all(
        np.array_equal(converted[k], weights[k]) for k in weights
    )


def corrupt(folder: Path, change) -> None:
    weights = load_torch(str(folder / WEIGHTS_NAME))
    change(weights)
    save_torch(weights, str(folder / WEIGHTS_NAME))


def _wrong_shape(w):
    w["decoder_layers.1.self_attn.rope_q.weight"] = torch.zeros(5, 3)


def _missing(w):
    del w["decoder_layers.0.mlp.routed_experts.6.down_proj.weight"]


def _extra(w):
    w["decoder_layers.0.mlp.unknown.weight"] = torch.zeros(2)


@pytest.mark.parametrize(
    "change, message",
    [
        (_wrong_shape, "'decoder_layers.1.self_attn.rope_q.weight' has shape (5, 3)"),
        (_missing, "missing tensor 'decoder_layers.0.mlp.routed_experts.6.down_proj.weight'"),
        (_extra, "unexpected tensor 'decoder_layers.0.mlp.unknown.weight'"),
    ],
    ids=["wrong-shape", "missing-key", "extra-key"],
)
def test_converter_refuses_bad_weights(tmp_path, change, message):
    src = tiny_torch_folder(tmp_path)
    corrupt(src, change)
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_folder(src, dst)
    result = CliRunner().invoke(torch_to_mlx.main, ["--src", str(src), "--dst", str(dst)])
    assert result.exit_code == 1 and message in result.output
    assert not isinstance(result.exception, ValueError)  # a clean message, no traceback
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_converter_refuses_config_that_does_not_match(tmp_path):
    src = tiny_torch_folder(tmp_path)
    config = json.loads((src / CONFIG_NAME).read_text())
    config["num_hidden_layers"] = 3
    (src / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="missing tensor 'decoder_layers.2.self_attn.kv_proj_d.weight'"
    ):
        convert_folder(src, tmp_path / "out")
    config["num_hidden_layers"], config["intermediate_size"] = 2, 96
    (src / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"'decoder_layers.0.mlp.shared_experts.0.gate_proj.weight' has shape \(128, 64\), the config expects \(96, 64\)",
    ):
        convert_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_refuses_missing_files_and_existing_dst(tmp_path):
    src = tiny_torch_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="source model folder not found"):
        convert_folder(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown dtype"):
        convert_folder(src, tmp_path / "out", dtype="int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert_folder(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (src / WEIGHTS_NAME).rename(src / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert_folder(src, tmp_path / "out")
    (src / CONFIG_NAME).unlink()
    result = CliRunner().invoke(
        mlx_to_torch.main, ["--src", str(src), "--dst", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "config.json" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_converter_force_never_deletes_the_source_or_other_files(tmp_path):
    """`--force` replaces a model folder only: never a folder that holds the source (the
    source went with it before) nor one with other files; a model folder is replaced."""
    src = tiny_torch_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(
        mlx_to_torch.main, ["--src", str(src), "--dst", str(tmp_path), "--force"]
    )
    assert result.exit_code == 1 and "holds the source folder" in result.output
    assert (src / WEIGHTS_NAME).is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is the source folder"):
        convert_folder(src, src, overwrite=True)
    other = tmp_path / "project"
    other.mkdir()
    (other / "train.py").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no model"):
        convert_folder(src, other, overwrite=True)
    assert (other / "train.py").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        convert_folder(src, tmp_path / "file", overwrite=True)
    convert_folder(src, tmp_path / "model")
    (tmp_path / "model" / "stale.txt").write_text("old")
    convert_folder(src, tmp_path / "model", dtype="bfloat16", overwrite=True)
    assert not (tmp_path / "model" / "stale.txt").exists()
    assert json.loads((tmp_path / "model" / CONFIG_NAME).read_text())["hidden_size"] == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_torch_to_mlx_script_on_a_cli_small_model(tmp_path, tokenizer_dir):
    """`customllm-torch init --preset small`, then `python convert/torch_to_mlx.py`."""
    from customllm_torch.cli import main as torch_cli

    src, dst = tmp_path / "small-torch", tmp_path / "small-mlx"
    args = ["init", "--preset", "small", "--out", str(src), "--tokenizer", str(tokenizer_dir)]
    result = CliRunner().invoke(torch_cli, args)
    assert result.exit_code == 0, result.output
    proc = subprocess.run(
        [
            sys.executable,
            str(CONVERT_DIR / "torch_to_mlx.py"),
            "--src",
            str(src),
            "--dst",
            str(dst),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = customllm_mlx.load(dst)
    assert len(tokenizer) == model.model_config.vocab_size == TOKENIZER_VOCAB_SIZE
    reference, _ = customllm_torch.load(src)
    ids = np.array([tokenizer("Once upon a time, a little dog found a red ball.")["input_ids"]])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=1e-4, rtol=0)


# Training: the two trainers take the same steps -------------------------------------------------
def test_both_trainers_take_the_same_steps(tmp_path):
    """`customllm-mlx train` and `customllm-torch train` (the HF Trainer) from the same weights
    on the same batches: the same losses, pre-clip gradient norms and learning rates at every
    step, and the same weights after them, tensor by tensor. Clipping acts (max_grad_norm under
    every step's norm), warmup and decay both run, and weight decay is 0.1 on matrices only
    (`decays`): an optimizer recipe that differs anywhere (the lr a step early, decay on the
    norms, clipping off) moves some tensor's update by far more than the tolerance."""
    import customllm_mlx.train as mlx_train
    import customllm_torch.train as torch_train
    from customllm.metrics import read_metrics
    from customllm.training import TrainConfig, lr_at
    from customllm_mlx.io import save

    init = tmp_path / "init"
    mx.random.seed(0)
    # the "sign" bias update, from exact counts: the "solve" rule's quantiles follow the
    # scores to float32 rounding, and a routing tie decided apart moves the next step more
    # than the tolerance (the solve's own parity: test_balancing_bias_and_its_update_agree)
    config = ModelConfig.from_preset("tiny", bias_update="sign", bias_update_rate=1e-3)
    save(MLXModel(config), init, tokenizer=str(TOKENIZER_DIR))
    run = dict(
        init=str(init),
        data=str(TRAIN_TXT),
        seq_len=32,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        steps=5,
        weight_decay=0.1,
        max_grad_norm=0.05,
        eval_every=0,
        save_every=5,
        keep_last=0,
        sample_every=0,
    )
    mlx_cfg = TrainConfig(**run, out=str(tmp_path / "mlx"))
    mlx_train.run_training(mlx_cfg)
    torch_train.run_training(TrainConfig(**run, out=str(tmp_path / "torch")), "cpu")

    def records(out):
        return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}

    a, b = records(tmp_path / "mlx"), records(tmp_path / "torch")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    # step 1's loss is the initial model's next-token loss on the stream's first two
    # micro-batches, averaged (the targets' shift: tests/test_train_*.py, the step tests)
    model, tokenizer = customllm_mlx.load(init)
    stream = StreamDataset(
        TRAIN_TXT, tokenizer, 32, shuffle_buffer=mlx_cfg.shuffle_buffer, seed=mlx_cfg.seed
    )
    first = [mx.array(stream.next_batch(4)) for _ in range(2)]
    expected = sum(causal_lm_loss(model(ids), ids).item() for ids in first) / 2
    assert a[1]["loss"] == pytest.approx(expected, rel=1e-5)
    for step in a:
        # measured: losses within 2e-7, norms 4e-5 (relative)
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=5e-4), step
        assert a[step]["grad_norm"] > run["max_grad_norm"]  # every step clipped
        assert a[step]["learning_rate"] == b[step]["learning_rate"] == lr_at(step - 1, mlx_cfg)
    start = load_numpy(str(init / WEIGHTS_NAME))
    ours, theirs = (
        load_numpy(str(tmp_path / f / "checkpoint-5" / WEIGHTS_NAME)) for f in ("mlx", "torch")
    )
    assert ours.keys() == theirs.keys() == start.keys()
    for key in start:
        moved, moved_too = ours[key] - start[key], theirs[key] - start[key]
        scale = np.linalg.norm(moved_too)
        if "expert_bias" in key:  # sign steps of exact counts, taken in both (a loop that
            # never updated the bias would agree with another that never did)
            assert np.abs(moved_too).max() > 0 and np.abs(moved).max() > 0, key
        if "expert_bias" in key or scale == 0:
            np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, err_msg=key)
            continue
        assert np.linalg.norm(moved - moved_too) <= 1e-3 * scale, key  # measured: 2e-5
    # the routers train at router_lr_scale x the lr: AdamW moves a weight by at most about the
    # lr per step (exactly lr x sign(g) at the first), so 5 steps bound each router weight
    router_scale = config.router_lr_scale
    lrs = sum(lr_at(s, mlx_cfg) for s in range(5))
    for moved in (ours, theirs):
        router = (
            moved["decoder_layers.0.mlp.router.weight"]
            - start["decoder_layers.0.mlp.router.weight"]
        )
        attn = (
            moved["decoder_layers.0.self_attn.o_proj.weight"]
            - start["decoder_layers.0.self_attn.o_proj.weight"]
        )
        assert (
            lr_at(0, mlx_cfg) * router_scale / 2 < np.abs(router).max() < 1.1 * lrs * router_scale
        )
        assert np.abs(attn).max() > 3 * lrs * router_scale


def test_balancing_bias_and_its_update_agree_across_frameworks():
    """The same drifted scores and routing statistics give the same balancing bias and the same
    bias after an update, in MLX and torch (the rule of docs/architecture.md, "Balancing")."""
    from customllm_mlx.model import balancing_bias as mlx_solve
    from customllm_torch.model import balancing_bias as torch_solve

    rng = np.random.default_rng(7)
    logits = np.linspace(0.0, 0.6, 7)[None] + 0.05 * rng.standard_normal((300, 7))
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
    start = (0.01 * rng.standard_normal(7)).astype(np.float32)
    a = np.array(mlx_solve(mx.array(scores), mx.array(start), 2))
    b = torch_solve(torch.from_numpy(scores), torch.from_numpy(start), 2).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - start).max() > 0.05  # it moved far from where it started

    config = ModelConfig.from_preset("tiny", vocab_size=256, bias_update_rate=0.7)
    reference = torch_model(config)
    mirror = mlx_copy(reference)
    load = rng.integers(0, 50, (config.num_hidden_layers, 7)).astype(np.float32)
    target = (0.1 * rng.standard_normal((config.num_hidden_layers, 7))).astype(np.float32)
    routing = np.stack([load, target * load.sum(-1, keepdims=True) / 2], axis=1)
    reference.update_expert_bias(torch.from_numpy(routing))
    mirror.update_expert_bias(mx.array(routing))
    for t_layer, m_layer in zip(reference.decoder_layers, mirror.decoder_layers, strict=True):
        np.testing.assert_allclose(
            np.array(m_layer.mlp.expert_bias), t_layer.mlp.expert_bias.numpy(), atol=1e-7
        )


def dense_config() -> ModelConfig:
    """The tiny preset's dense baseline: no routed experts, the shared SwiGLU (1 + top-2) x
    as wide, so that it has the MoE's active parameters."""
    tiny = ModelConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=64)
    return ModelConfig.from_preset(
        "tiny", vocab_size=256, max_position_embeddings=64, n_routed_experts=0,
        intermediate_size=3 * tiny.intermediate_size,
    )  # fmt: skip


def test_dense_config_through_both_frameworks_and_both_converters(tmp_path):
    config = dense_config()
    reference = torch_model(config)
    assert not any("router" in k or "routed" in k or "bias" in k.split(".")[-1]
                   for k in reference.state_dict() if k != "lm_head.bias")  # fmt: skip
    assert sum(p.numel() for p in reference.parameters()) == config.num_parameters()
    src = customllm_torch.save(reference, tmp_path / "torch")
    assert ModelConfig.from_json(src).n_routed_experts == 0
    run_script(torch_to_mlx, "--src", src, "--dst", tmp_path / "mlx", "--verify")
    run_script(mlx_to_torch, "--src", tmp_path / "mlx", "--dst", tmp_path / "back")
    assert_same_tensors(src, tmp_path / "mlx")
    assert_same_tensors(src, tmp_path / "back")
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    mirror, _ = customllm_mlx.load(tmp_path / "mlx")
    logits, aux, routing = mirror(mx.array(ids), return_aux=True)
    assert routing.shape == (config.num_hidden_layers, 2, 0) and aux.item() == 0
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-5 * np.abs(expected).max())


def test_eval_command_gives_the_same_loss_in_both_frameworks(tmp_path):
    """`customllm-mlx eval` and `customllm-torch eval` on one folder and one text: the same
    tokens, loss (1e-4), perplexity and MaxVio, printed and in --json."""
    from customllm.tokenizer import train_tokenizer
    from customllm_mlx.cli import main as mlx_cli
    from customllm_torch.cli import main as torch_cli

    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(f"Story {i}: the cat sat on mat {i % 7}." for i in range(300)))
    tokenizer = train_tokenizer(str(text), 300, tmp_path / "tok")
    config = ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=64)
    folder = customllm_torch.save(torch_model(config), tmp_path / "model", tokenizer=tokenizer)
    results = []
    for name, cli in (("mlx", mlx_cli), ("torch", torch_cli)):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--model", folder, "--data", text, "--seq-len", 32, "--batch-size", 4,
                "--json", out]  # fmt: skip
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        record = json.loads(out.read_text())
        assert f"{record['tokens']:,} tokens | loss {record['loss']:.4f}" in result.output
        results.append(record)
    mlx_result, torch_result = results
    assert mlx_result["tokens"] == torch_result["tokens"] > 1000
    assert mlx_result["loss"] == pytest.approx(torch_result["loss"], abs=1e-4)
    assert mlx_result["loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.3)  # untrained
    assert mlx_result["perplexity"] == pytest.approx(math.exp(mlx_result["loss"]))
    assert mlx_result["max_vio"] == pytest.approx(torch_result["max_vio"], abs=1e-6)
    assert mlx_result["max_vio"] > 0
    bad = CliRunner().invoke(mlx_cli, ["eval", "--model", str(folder), "--data",
                                       str(tmp_path / "missing.txt")])  # fmt: skip
    assert bad.exit_code != 0 and "Error: --data" in bad.output


def test_converters_refuse_a_damaged_tokenizer_and_leave_nothing_behind(tmp_path, tokenizer_dir):
    src = tiny_torch_folder(tmp_path, tokenizer_dir)
    (src / "tokenizer.json").write_text("{")
    for module in (torch_to_mlx, mlx_to_torch):
        dst = tmp_path / f"out_{module.__name__}"
        result = CliRunner().invoke(module.main, ["--src", str(src), "--dst", str(dst)])
        assert result.exit_code == 1 and "so it was removed" in result.output, result.output
        assert not dst.exists()
