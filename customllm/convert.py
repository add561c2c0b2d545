"""Model-folder conversion at the numpy level: the one mapping both converters share.

The folder format is canonical (docs/architecture.md keys, Linear weights `(out, in)`), so torch
-> MLX and MLX -> torch are the same operation: read a folder, bring its weights to the
canonical keys (strip `_orig_mod.`/`module.` wrapper prefixes, unstack stacked experts),
check them against config.json, cast, and write the destination atomically.

The source may be a canonical model folder or a Hugging Face Trainer `checkpoint-N/` folder
(`model.safetensors`, possibly sharded with an index, config.json written by transformers).
numpy has no bfloat16: bfloat16 tensors are widened to float32 on read (exact) and narrowed
with round-to-nearest-even on the raw bits on write, so no framework is needed here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from customllm.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    check_not_quantized,
    check_not_source,
    check_replaceable,
    check_weights,
    load_numpy_weights,
    ordered,
    save_model_folder,
    strip_wrapper_prefixes,
    unstack_experts,
)
from customllm.config import ModelConfig

DTYPES = ("float32", "bfloat16", "float16")
SHARD_INDEX_NAME = "model.safetensors.index.json"
# Kept in float32 whatever the target dtype: routing-bias steps of 1e-3 vanish in bfloat16.
FLOAT32_KEYS_SUFFIX = ("expert_bias",)
# Config keys transformers writes that describe the stored dtype (rewritten on conversion).
DTYPE_CONFIG_KEYS = ("dtype", "torch_dtype")

_SAFETENSORS_DTYPE = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
}


def convert_folder(
    src: str | Path, dst: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Convert the model folder `src` into the canonical folder `dst`, stored in `dtype`.

    Raises FileNotFoundError (missing folder, config.json or weights) or ValueError (a missing,
    extra or mis-shaped tensor, named; a bad dtype; an existing `dst`). `dst` is written under a
    temporary name and renamed into place, so a failure never leaves a half-written folder.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not src.is_dir():
        raise FileNotFoundError(f"source model folder not found: {src}")
    check_not_source(dst, src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not overwrite:
            raise ValueError(
                f"destination {dst} already exists; pass overwrite (--force) to replace it"
            )
        check_replaceable(dst)

    config = read_config(src)
    weights = canonical_numpy_weights(src, config)
    weights = {key: cast(value, dtype, key) for key, value in weights.items()}
    for key in DTYPE_CONFIG_KEYS:
        if key in config.extra:
            config.extra[key] = dtype

    def write_weights(file: Path) -> None:
        write_safetensors(file, weights, metadata={"format": "pt"})

    tokenizer = src if any((src / name).is_file() for name in TOKENIZER_FILES) else None
    return save_model_folder(dst, config, write_weights, tokenizer=tokenizer)


def read_config(folder: Path) -> ModelConfig:
    """config.json of a canonical or transformers-written folder (unknown keys go to `extra`)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"config not found: {path} (a model folder needs config.json beside its weights)"
        )
    try:
        return ModelConfig.from_json(path)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from err


def canonical_numpy_weights(folder: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """The folder's weights under canonical keys, checked against `config`, in canonical order."""
    check_not_quantized(config, str(folder))
    weights, source = read_numpy_weights(folder)
    weights = unstack_experts(strip_wrapper_prefixes(weights))
    check_weights(weights, config, source=source)
    return ordered(weights, config)


def read_numpy_weights(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of `model.safetensors` (or of the shards an index names); bf16 -> float32."""
    index = folder / SHARD_INDEX_NAME
    if not (folder / WEIGHTS_NAME).is_file() and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors shard index: {err}") from err
        weights = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(
                    f"weights shard not found: {folder / shard} (named in {index})"
                )
            weights.update(_read_safetensors(folder / shard))
        return weights, str(index)
    if not (folder / WEIGHTS_NAME).is_file() and (folder / "pytorch_model.bin").is_file():
        raise FileNotFoundError(
            f"weights not found: {folder / WEIGHTS_NAME}; {folder} holds pytorch_model.bin, which "
            "this converter does not read (save with safe_serialization=True)"
        )
    return load_numpy_weights(folder), str(folder / WEIGHTS_NAME)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from customllm.checkpoint import _load_bf16_as_float32

    return _load_bf16_as_float32(path)


# Casting ------------------------------------------------------------------------------------
def cast(value: np.ndarray, dtype: str, key: str = "") -> np.ndarray | BFloat16Array:
    """Cast a floating-point tensor to `dtype` (bfloat16 as raw bits); other tensors unchanged.
    `expert_bias` stays float32."""
    if not np.issubdtype(value.dtype, np.floating):
        return value
    if key.endswith(FLOAT32_KEYS_SUFFIX) or dtype == "float32":
        return value.astype(np.float32, copy=False)
    if dtype == "float16":
        return value.astype(np.float16)
    return BFloat16Array(float32_to_bfloat16_bits(value.astype(np.float32, copy=False)))


class BFloat16Array:
    """bfloat16 tensor held as its uint16 bit patterns (numpy has no bfloat16)."""

    dtype_name = "bfloat16"

    def __init__(self, bits: np.ndarray):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)
        self.shape = self.bits.shape

    def to_float32(self) -> np.ndarray:
        return bfloat16_bits_to_float32(self.bits)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns.
    NaN stays a (quiet) NaN with its sign; overflow rounds to infinity, as in torch and mlx."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        quiet = ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
        rounded = np.where(nan, quiet, rounded)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# Writing ------------------------------------------------------------------------------------
def write_safetensors(
    path: str | Path, tensors: dict, metadata: dict[str, str] | None = None
) -> None:
    """Write numpy arrays and `BFloat16Array`s to a .safetensors file, in the given order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for key, value in tensors.items():
        if isinstance(value, BFloat16Array):
            name, data = "bfloat16", value.bits
        else:
            data = np.ascontiguousarray(value)
            name = data.dtype.name
            if data.dtype.byteorder == ">":
                data = data.byteswap().view(data.dtype.newbyteorder("<"))
        if name not in _SAFETENSORS_DTYPE:
            raise ValueError(f"tensor {key!r}: cannot store dtype {name} in safetensors here")
        raw = data.tobytes()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPE[name],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for raw in blobs:
            f.write(raw)
