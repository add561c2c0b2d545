"""Load and save the canonical model folder (config.json, model.safetensors, tokenizer files).

The torch state-dict keys are already the canonical keys of docs/architecture.md (RoPE keeps no
buffers), so saving is a contiguous copy of the state dict and
loading is a checked, strict `load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from customllm.checkpoint import (
    CONFIG_NAME,
    check_loaded,
    check_weights,
    find_weights_file,
    ordered,
    save_model_folder,
    strip_wrapper_prefixes,
)
from customllm.config import ModelConfig
from customllm.tokenizer import load_folder_tokenizer
from customllm_torch.model import CustomLLM


def cast_model(model: CustomLLM, dtype: torch.dtype) -> CustomLLM:
    """`model.to(dtype)` but for the routing `expert_bias`, which stays float32 (as `save`
    stores it, and as MLX keeps it)."""
    model.to(dtype)
    for layer in model.decoder_layers:
        if layer.mlp.num_experts:
            layer.mlp.expert_bias = layer.mlp.expert_bias.float()
    return model


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[CustomLLM, object | None]:
    """Read a model folder: (model in eval mode, tokenizer or None when the folder has none).

    The model is float32 unless `dtype` is given, whatever dtype the file stores; the routing
    `expert_bias` stays float32 (as `save` stores it, and as MLX keeps it)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    config = ModelConfig.from_json(path / CONFIG_NAME)
    weights_path = find_weights_file(path)
    try:
        weights = load_file(str(weights_path))
    except Exception as err:
        raise ValueError(f"cannot read {weights_path}: {err}") from err
    weights = strip_wrapper_prefixes(weights)
    check_weights(weights, config, source=str(weights_path))

    # Build without initialising (meta), allocate on the device, then fill from the file.
    with torch.device("meta"):
        model = CustomLLM(config)
    if dtype is not None:
        cast_model(model, dtype)
    model.to_empty(device=device)
    model.load_state_dict(weights, strict=True)
    model.eval()
    tokenizer = load_folder_tokenizer(path)
    non_finite = [
        k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    check_loaded(path, config, tokenizer, non_finite)
    return model, tokenizer


def save(
    model: nn.Module,
    path: str | Path,
    tokenizer: object | str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `path/` atomically with canonical keys; `dtype` casts the floating-point weights
    (the routing `expert_bias` stays float32: small bias steps vanish in bfloat16)."""
    model = unwrap(model)
    config: ModelConfig = model.model_config
    weights = {}
    for key, tensor in strip_wrapper_prefixes(model.state_dict()).items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and not key.endswith("expert_bias"):
            tensor = tensor.to(dtype)
        weights[key] = tensor.to("cpu").contiguous()
    check_weights(weights, config, source="model state dict")
    weights = ordered(weights, config)

    def write_weights(file: Path) -> None:
        save_file(weights, str(file), metadata={"format": "pt"})

    return save_model_folder(path, config, write_weights, tokenizer)


def unwrap(model: nn.Module) -> CustomLLM:
    """The CustomLLM inside torch.compile / DDP / FSDP wrappers."""
    while not isinstance(model, CustomLLM):
        inner = getattr(model, "_orig_mod", getattr(model, "module", None))
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a CustomLLM, got {type(model).__name__}")
        model = inner
    return model
