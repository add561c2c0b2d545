"""Load and save the canonical model folder (config.json, model.safetensors, tokenizer files).

The file holds the canonical keys of docs/architecture.md (one tensor per routed expert); the MLX
model holds the routed experts stacked (E, out, in). Weights are checked under the canonical
keys before stacking, so an error names the tensor as it appears in the file.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from customllm.checkpoint import (
    CONFIG_NAME,
    check_loaded,
    check_weights,
    find_weights_file,
    ordered,
    save_model_folder,
    strip_wrapper_prefixes,
    unstack_experts,
)
from customllm.config import ModelConfig
from customllm.tokenizer import load_folder_tokenizer
from customllm_mlx.model import CustomLLM

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def load(path: str | Path, dtype: mx.Dtype | str | None = None) -> tuple[CustomLLM, object | None]:
    """Read a model folder: (model in eval mode, tokenizer or None when the folder has none).

    `dtype` casts the floating-point weights (the routing `expert_bias` stays as stored)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    dtype = as_dtype(dtype)
    config = ModelConfig.from_json(path / CONFIG_NAME)
    weights_path = find_weights_file(path)
    try:
        weights = mx.load(str(weights_path))
    except Exception as err:
        raise ValueError(f"cannot read {weights_path}: {err}") from err
    model = CustomLLM(config)  # the random init is lazy and is replaced before it is computed
    quantization = config.extra.get("quantization")
    if quantization:  # mlx_lm's layout: the model's own keys, experts stacked
        weights = strip_wrapper_prefixes(weights)
        quantize(model, quantization, lambda p: f"{p}.scales" in weights)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as err:
            raise ValueError(f"{weights_path} does not fit config.json: {err}") from err
    else:
        weights = unstack_experts(strip_wrapper_prefixes(weights))
        check_weights(weights, config, source=str(weights_path))
        if dtype is not None:
            weights = {k: cast(k, v, dtype) for k, v in weights.items()}
        model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    tokenizer = load_folder_tokenizer(path)
    floats = [(k, v) for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
    finite = mx.stack([mx.isfinite(v).all() for _, v in floats]).tolist() if floats else []
    bad = [k for (k, _), ok in zip(floats, finite, strict=True) if not ok]
    check_loaded(path, config, tokenizer, bad)
    return model, tokenizer


def save(
    model: CustomLLM,
    path: str | Path,
    tokenizer: object | str | Path | None = None,
    dtype: mx.Dtype | str | None = None,
) -> Path:
    """Write `path/` atomically with canonical keys; `dtype` casts the floating-point weights
    (the routing `expert_bias` stays float32: small bias steps vanish in bfloat16)."""
    if not isinstance(model, CustomLLM):
        raise TypeError(f"expected a customllm_mlx CustomLLM, got {type(model).__name__}")
    dtype = as_dtype(dtype)
    config: ModelConfig = model.model_config
    weights = model.canonical_weights()
    if dtype is not None:
        weights = {
            k: v.astype(mx.float32) if k.endswith("expert_bias") else cast(k, v, dtype)
            for k, v in weights.items()
        }
    check_weights(weights, config, source="model parameters")
    weights = ordered(weights, config)
    mx.eval(weights)

    def write_weights(file: Path) -> None:
        mx.save_safetensors(str(file), weights, metadata={"format": "pt"})

    return save_model_folder(path, config, write_weights, tokenizer)


def quantize(model: CustomLLM, settings: dict, chosen=None) -> None:
    """Quantize `model` in place as config.json's "quantization" says ({group_size, bits,
    mode}, and per-layer entries as mlx_lm writes them): every layer `chosen(path)` accepts,
    else every layer `model.quant_predicate` keeps (not the routers) whose width the group
    size divides."""
    group_size, bits = settings.get("group_size", 64), settings.get("bits", 4)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if chosen is not None:
            if not chosen(path):
                return False
            return settings.get(path, True)  # a layer quantized its own way, as mlx_lm writes
        return model.quant_predicate(path, module) and module.weight.shape[-1] % group_size == 0

    mode = settings.get("mode", "affine")
    nn.quantize(model, group_size, bits, mode=mode, class_predicate=predicate)


def save_quantized(
    model: CustomLLM, path: str | Path, settings: dict, tokenizer: object | None = None
) -> Path:
    """Write a quantized model's folder as mlx_lm does: its own keys (experts stacked, with
    scales and biases), config.json with "quantization"."""
    config = ModelConfig.from_dict({**model.model_config.to_dict(), "quantization": settings})
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)

    def write_weights(file: Path) -> None:
        mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})

    return save_model_folder(path, config, write_weights, tokenizer)


def as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    """`mx.bfloat16` or "bfloat16" (also "float32", "float16") -> mx.Dtype; None stays None."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cast(key: str, value: mx.array, dtype: mx.Dtype) -> mx.array:
    if key.endswith("expert_bias") or not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(dtype)
