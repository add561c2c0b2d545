"""MLX users' own tools on CustomLLM model folders: quantization (this package's command and
mlx_lm's convert -q), mlx_lm's loader and generation on quantized folders."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402
from customllm_mlx.cli import main as mlx_cli  # noqa: E402
from customllm_mlx.generate import stream_generate  # noqa: E402
from customllm_mlx.io import load, save  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402

PROMPT = "Once upon a time"
CONVERT_DIR = Path(__file__).resolve().parents[1] / "convert"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, builtin_tokenizer):
    """A random model at widths that quantize in groups of 32 (973m's ratios, narrow)."""
    config = ModelConfig.from_preset(
        "tiny", vocab_size=512, hidden_size=128, q_latent_dim=64, kv_latent_dim=64,
        intermediate_size=256, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
        initializer_range=0.1, max_position_embeddings=128,
    )  # fmt: skip
    mx.random.seed(0)
    path = tmp_path_factory.mktemp("mlx-tools") / "model"
    save(CustomLLM(config), path, tokenizer=builtin_tokenizer)
    return path


def greedy(model, tokenizer, n=12) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=n)]


def theirs(path, n=12) -> list[int]:
    model, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=n)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_command_writes_a_folder_both_loaders_generate_alike_from(folder, tmp_path, bits):
    out = tmp_path / f"q{bits}"
    argv = ["quantize", "--model", str(folder), "--out", str(out), "--bits", str(bits)]
    result = CliRunner().invoke(mlx_cli, [*argv, "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == bits
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "decoder_layers.0.mlp.routed_experts.gate_proj.scales" in keys  # experts quantized
    assert "decoder_layers.0.self_attn.k_proj_u.scales" in keys
    assert "decoder_layers.0.mlp.router.scales" not in keys  # the router stays full precision

    model, tokenizer = load(out)
    ours = greedy(model, tokenizer)
    assert theirs(out) == ours
    per_weight = float(result.output.split(", ")[-1].split()[0])
    assert per_weight < {4: 6.1, 8: 10.1}[bits]  # bfloat16 scales and biases per 32 weights

    again = CliRunner().invoke(mlx_cli, [*argv, "--group-size", "32"])
    assert again.exit_code != 0 and "exists and is not empty" in again.output


def test_mlx_lm_convert_q_folders_load_here_and_the_converters_refuse_them(folder, tmp_path):
    from mlx_lm import convert

    out = tmp_path / "mlx-lm-q4"
    convert(str(folder), str(out), quantize=True, q_bits=4, q_group_size=32, trust_remote_code=True)
    model, tokenizer = load(out)
    assert greedy(model, tokenizer) == theirs(out)

    spec = importlib.util.spec_from_file_location("mlx_to_torch", CONVERT_DIR / "mlx_to_torch.py")
    mlx_to_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mlx_to_torch)
    result = CliRunner().invoke(
        mlx_to_torch.main, ["--src", str(out), "--dst", str(tmp_path / "torch")]
    )
    assert result.exit_code != 0 and "quantized" in result.output
    assert not (tmp_path / "torch").exists()


def test_a_quantized_model_generates_what_its_full_forward_predicts(folder, tmp_path):
    from customllm_mlx.io import quantize

    model, tokenizer = load(folder)
    quantize(model, {"group_size": 32, "bits": 4})
    tokens = greedy(model, tokenizer, n=8)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False) + tokens
    logits = model(mx.array([ids]))[0]
    predicted = mx.argmax(logits[len(ids) - len(tokens) - 1 : -1], axis=-1).tolist()
    assert predicted == tokens


def test_routed_experts_quantize_with_the_model(folder):
    from customllm_mlx.experts import QuantizedStackedExpertLinear
    from customllm_mlx.io import quantize

    model, _ = load(folder)
    quantize(model, {"group_size": 32, "bits": 4})
    mlp = model.layers[0].mlp
    assert isinstance(mlp.routed_experts.gate_proj, QuantizedStackedExpertLinear)
    assert type(mlp.router).__name__ == "Linear"
    assert dataclasses.is_dataclass(model.model_config)


def test_export_writes_a_folder_this_package_and_mlx_lm_load(folder, tmp_path):
    out = tmp_path / "hub"
    result = CliRunner().invoke(mlx_cli, ["export", "--model", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "modeling_customllm.py").is_file() and (out / "README.md").is_file()
    assert greedy(*load(out)) == theirs(out) == greedy(*load(folder))


def test_kv_bits_is_refused_with_a_clear_message(folder):
    """mlx_lm's --kv-bits turns each KVCache into a QuantizedKVCache: the next step says why
    the latent cache is not quantized further."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    model, _ = load(folder)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    maybe_quantize_kv_cache(cache, quantized_kv_start=0, kv_group_size=64, kv_bits=4)
    with pytest.raises(ValueError, match="not quantized further \\(leave --kv-bits out\\)"):
        model(mx.array([[4]]), cache=cache)


def test_mlx_lm_prompt_cache_files_hold_the_latent_cache(folder, tmp_path):
    """A prompt cache saved and loaded with mlx_lm's own functions, and the files its
    `cache_prompt` command writes, continue generation exactly as the live cache does."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    model, tokenizer = load(folder)
    prompt, more = mx.array([[5, 9, 2, 7, 3, 11]]), mx.array([[4, 8]])
    live = model.make_cache()
    model(prompt, cache=live)
    save_prompt_cache(str(tmp_path / "c.safetensors"), live, {"model": str(folder)})
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c).__name__ for c in loaded] == ["KVCache"] * len(live)
    expected = model(more, cache=live)
    np.testing.assert_array_equal(np.array(model(more, cache=loaded)), np.array(expected))

    text = "Once upon a time there was a"
    cache_file = tmp_path / "prompt.safetensors"
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "cache_prompt", "--model", str(folder),
         "--prompt", text, "--prompt-cache-file", str(cache_file), "--trust-remote-code"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    generate = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder),
                "--max-tokens", "8", "--temp", "0", "--trust-remote-code"]  # fmt: skip
    cached = subprocess.run(
        [*generate, "--prompt-cache-file", str(cache_file), "--prompt", " little"],
        capture_output=True, text=True,
    )  # fmt: skip
    whole = subprocess.run(
        [*generate, "--prompt", text + " little"], capture_output=True, text=True
    )
    assert cached.returncode == 0 and whole.returncode == 0, cached.stderr + whole.stderr
    answer = [line for line in cached.stdout.split("==========")[1:2]]
    assert answer and answer == whole.stdout.split("==========")[1:2], (cached.stdout, whole.stdout)


def test_mlx_lm_lora_adapters_generate_as_the_fused_model(folder, tmp_path):
    """`mlx_lm.lora` on a model folder, then generation with --adapter-path (unfused: the
    absorbed decode reads the LoRA layers' effective matrices) equals the fused model's."""

    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(
        json.dumps({"text": f"Story {i}: once upon a time a cat sat."}) + "\n" for i in range(8)
    )
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text(rows)
    adapters, fused = tmp_path / "adapters", tmp_path / "fused"
    common = ["--model", str(folder), "--adapter-path", str(adapters), "--trust-remote-code"]
    train = [sys.executable, "-m", "mlx_lm", "lora", *common, "--train", "--data", str(data),
             "--iters", "4", "--batch-size", "2", "--num-layers", "-1", "--learning-rate", "0.05",
             "--val-batches", "1", "--steps-per-report", "4"]  # fmt: skip
    fuse = [sys.executable, "-m", "mlx_lm", "fuse", *common, "--save-path", str(fused)]
    for argv in (train, fuse):
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
    model, tokenizer = mlx_lm.load(str(folder), adapter_path=str(adapters), trust_remote_code=True)
    assert type(model.layers[0].self_attn.k_proj_u).__name__ == "LoRALinear"
    unfused = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=12)]
    assert unfused == theirs(fused)
    assert unfused != theirs(folder)  # the adapters changed the model


def test_batch_generate_equals_one_prompt_at_a_time(folder):
    """mlx_lm's batch_generate (a BatchKVCache per layer: right-padded prefill, then left
    padding masked out, one position per row) on 3 prompts of different lengths gives each
    prompt's greedy tokens alone."""
    from mlx_lm.generate import batch_generate

    model, tokenizer = mlx_lm.load(str(folder), trust_remote_code=True)
    prompts = [tokenizer.encode(p) for p in ("Once", "Once upon a time there", "She said")]
    assert len({len(p) for p in prompts}) == 3
    batched = batch_generate(model, tokenizer, prompts, max_tokens=10, return_token_ids=True)
    for prompt, tokens in zip(prompts, batched.token_ids, strict=True):
        alone = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=10)]
        if alone[-1] in tokenizer.eos_token_ids:  # stream_generate yields the EOS, batches not
            alone = alone[:-1]
        assert list(tokens) == alone, (prompt, tokens, alone)
