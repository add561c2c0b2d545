"""Canonical checkpoint keys and the model-folder layout, shared by both frameworks.

A model folder holds ``config.json``, ``model.safetensors`` (canonical keys, Linear weights
``(out, in)``) and the tokenizer files. Frameworks may hold routed experts stacked
``(E, out, in)``; ``stack_experts``/``unstack_experts`` map between the two layouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from customllm.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ATTN_PROJECTIONS = (
    "kv_proj_d",
    "q_proj_d",
    "k_proj_u",
    "v_proj_u",
    "q_proj_u",
    "rope_k",
    "rope_q",
    "o_proj",
)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# mlx_lm builds a model from a folder's `model_file` (with trust_remote_code=True); this shim
# only points it at the installed customllm_mlx package.
MLX_LM_SHIM_NAME = "customllm_mlx_lm.py"
MLX_LM_SHIM = (
    '"""Lets mlx_lm.load(folder, trust_remote_code=True) build CustomLLM (needs customllm[mlx])."""\n'
    "import customllm_mlx\n\n"
    "customllm_mlx.setup_cpu()  # on a Linux CPU: names the fix when MLX's slow BLAS is in use\n"
    "from customllm_mlx.model import Model, ModelArgs  # noqa: E402, F401\n"
)
# Prefixes that torch.compile, DDP and FSDP wrappers add to state-dict keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical key with its shape, in docs/architecture.md order."""
    d, h = config.hidden_size, config.num_attention_heads
    attn_shapes = {
        "kv_proj_d": (config.kv_latent_dim, d),
        "q_proj_d": (config.q_latent_dim, d),
        "k_proj_u": (h * config.qk_nope_head_dim, config.kv_latent_dim),
        "v_proj_u": (h * config.v_head_dim, config.kv_latent_dim),
        "q_proj_u": (h * config.qk_nope_head_dim, config.q_latent_dim),
        "rope_k": (h * config.qk_rope_head_dim, d),
        "rope_q": (h * config.qk_rope_head_dim, config.q_latent_dim),
        "o_proj": (d, h * config.v_head_dim),
    }
    expert_shapes = {
        "gate_proj": (config.intermediate_size, d),
        "up_proj": (config.intermediate_size, d),
        "down_proj": (d, config.intermediate_size),
    }
    shapes: dict[str, tuple[int, ...]] = {
        "token_embeddings.weight": (config.vocab_size, d),
        "position_embeddings.weight": (config.max_position_embeddings, d),
    }
    for i in range(config.num_hidden_layers):
        layer = f"decoder_layers.{i}"
        for name in ATTN_PROJECTIONS:
            shapes[f"{layer}.self_attn.{name}.weight"] = attn_shapes[name]
        experts = [f"shared_experts.{e}" for e in range(config.n_shared_experts)]
        experts += [f"routed_experts.{e}" for e in range(config.n_routed_experts)]
        for expert in experts:
            for name in EXPERT_PROJECTIONS:
                shapes[f"{layer}.mlp.{expert}.{name}.weight"] = expert_shapes[name]
        if config.n_routed_experts:  # a dense model (0) has no router and no bias
            shapes[f"{layer}.mlp.router.weight"] = (config.n_routed_experts, d)
            shapes[f"{layer}.mlp.expert_bias"] = (config.n_routed_experts,)
        shapes[f"{layer}.input_norm.weight"] = (d,)
        shapes[f"{layer}.post_attn_norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    if config.lm_head_bias:
        shapes["lm_head.bias"] = (config.vocab_size,)
    return shapes


def canonical_keys(config: ModelConfig) -> list[str]:
    return list(canonical_shapes(config))


def strip_wrapper_prefixes(weights: dict) -> dict:
    """Drop `_orig_mod.` / `module.` prefixes (torch.compile, DDP, FSDP) from every key."""
    out = {}
    for key, value in weights.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = next(key[len(p) :] for p in WRAPPER_PREFIXES if key.startswith(p))
        out[key] = value
    return out


def check_weights(weights: dict, config: ModelConfig, source: str = "weights") -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped tensor."""
    check_not_quantized(config, source)
    check_shapes({key: tuple(value.shape) for key, value in weights.items()}, config, source)


def check_not_quantized(config: ModelConfig, source: str) -> None:
    """Quantized weights (config.json's "quantization") are for customllm_mlx and mlx_lm only."""
    quantized = config.extra.get("quantization")
    if quantized:
        bits = quantized.get("bits", "?") if isinstance(quantized, dict) else "?"
        raise ValueError(
            f"{source} holds {bits}-bit quantized weights, which only customllm_mlx and mlx_lm "
            "read; use the full-precision folder it was quantized from"
        )


def check_loaded(folder: str | Path, config: ModelConfig, tokenizer, non_finite: list[str]) -> None:
    """What a loader checks after reading a folder: no tensor holds NaN/inf (`non_finite`: the
    keys that do), and the tokenizer has no token id past the model's vocabulary."""
    if non_finite:
        more = f" (and {len(non_finite) - 1} more)" if len(non_finite) > 1 else ""
        raise ValueError(
            f"{folder}: tensor {non_finite[0]!r}{more} holds NaN or inf values; the weights "
            "are damaged (a diverged run?): use an earlier checkpoint"
        )
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{folder}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size {config.vocab_size} (ids past it have no embedding); put the tokenizer "
            "the model was trained with in the folder"
        )


def check_shapes(shapes: dict, config: ModelConfig, source: str = "weights") -> None:
    """`check_weights` on the tensors' shapes alone (a safetensors header's, say)."""
    expected = canonical_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise ValueError(
            f"{source}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " for the config; do the weights and config.json belong together?"
        )
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise ValueError(
            f"{source}: unexpected tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + " that the config does not have"
        )
    for key, shape in expected.items():
        got = tuple(shapes[key])
        if got != shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {got}, the config expects {shape}"
            )


_ROUTED = re.compile(r"^(decoder_layers\.\d+\.mlp)\.routed_experts\.(\d+)\.(\w+)\.weight$")


def stack_experts(weights: dict, config: ModelConfig, stack: Callable) -> dict:
    """Canonical -> stacked: `...mlp.routed_experts.{e}.{proj}.weight` become
    `...mlp.routed_experts.{proj}.weight` of shape (E, out, in). `stack` is the framework's stack."""
    out, groups = {}, {}
    for key, value in weights.items():
        match = _ROUTED.match(key)
        if match:
            prefix, expert, proj = match.groups()
            groups.setdefault((prefix, proj), {})[int(expert)] = value
        else:
            out[key] = value
    for (prefix, proj), experts in groups.items():
        out[f"{prefix}.routed_experts.{proj}.weight"] = stack([experts[e] for e in sorted(experts)])
    return out


_STACKED = re.compile(r"^(decoder_layers\.\d+\.mlp)\.routed_experts\.([a-z_]+)\.weight$")


def unstack_experts(weights: dict) -> dict:
    """Stacked -> canonical: the inverse of `stack_experts` (indexing works for numpy and mlx)."""
    out = {}
    for key, value in weights.items():
        match = _STACKED.match(key)
        if match:
            prefix, proj = match.groups()
            for e in range(value.shape[0]):
                out[f"{prefix}.routed_experts.{e}.{proj}.weight"] = value[e]
        else:
            out[key] = value
    return out


def ordered(weights: dict, config: ModelConfig) -> dict:
    """Canonical order of docs/architecture.md (stable file layout)."""
    return {k: weights[k] for k in canonical_keys(config) if k in weights}


def find_weights_file(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a model folder: {folder}")
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {', '.join(found)})" if found else ""
        raise FileNotFoundError(f"weights not found: {path}{hint}")
    return path


def load_numpy_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """Read model.safetensors into numpy (bfloat16 is widened to float32: numpy has no bf16)."""
    from safetensors import safe_open

    path = find_weights_file(folder)
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except TypeError:  # bfloat16 has no numpy dtype: read through the byte layout instead
        return _load_bf16_as_float32(path)
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _load_bf16_as_float32(path: Path) -> dict[str, np.ndarray]:
    import json
    import struct

    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[base + start : base + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(info["shape"])
        else:
            dtype = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}[
                info["dtype"]
            ]
            out[key] = np.frombuffer(raw, dtype=dtype).reshape(info["shape"]).copy()
    return out


def check_not_source(dst: str | Path, source: str | Path) -> None:
    """Raise ValueError when writing the folder `dst` would replace `source`: `dst` is the
    source folder or a folder above it."""
    dst, src = Path(dst).resolve(), Path(source).resolve()
    if dst == src:
        raise ValueError(f"destination {dst} is the source folder; choose another --dst")
    if dst in src.parents:
        raise ValueError(
            f"destination {dst} holds the source folder {src}; replacing it would delete the "
            "source. Choose another --dst"
        )


def check_replaceable(dst: str | Path) -> None:
    """Raise ValueError unless a forced write (`--force`) may replace `dst` with a model folder:
    it must be a folder that holds a model folder (config.json or model.safetensors) or nothing.
    The write replaces the whole folder, so `--dst .` or a home folder would go with it."""
    dst = Path(dst)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ValueError(f"destination {dst} is a file, not a folder; choose another")
    model = any((dst / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))
    if not model and any(dst.iterdir()):
        raise ValueError(
            f"destination {dst} holds files but no model ({CONFIG_NAME} or {WEIGHTS_NAME}), "
            "and --force would delete them with the folder; choose another folder"
        )


@contextmanager
def atomic_folder(dst: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name beside `dst`, then rename it into place.

    A crash at any moment leaves either the old `dst` or the complete new one, never half.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model folder is for everyone to read
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)  # some writers (safetensors' torch) make 0600
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_folder(
    dst: str | Path,
    config: ModelConfig,
    write_weights: Callable[[Path], None],
    tokenizer=None,
) -> Path:
    """Write `dst/` atomically: config.json, model.safetensors (via `write_weights(path)`),
    and the tokenizer files when a tokenizer (or a tokenizer folder path) is given."""
    dst = Path(dst)
    with atomic_folder(dst) as tmp:
        config.to_json(tmp / CONFIG_NAME, architectures=["CustomLLM"], model_file=MLX_LM_SHIM_NAME)
        (tmp / MLX_LM_SHIM_NAME).write_text(MLX_LM_SHIM)
        write_weights(tmp / WEIGHTS_NAME)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
    return dst


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def save_tokenizer_files(tokenizer, folder: Path) -> None:
    """Copy a tokenizer folder's files, or call `save_pretrained` on a tokenizer object."""
    if isinstance(tokenizer, (str, Path)) and Path(tokenizer).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, folder / name)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        raise ValueError(f"cannot save tokenizer {tokenizer!r}: not a folder or a tokenizer")
    with_pad_token(folder)


def with_pad_token(folder: Path) -> None:
    """Give the tokenizer in `folder` a pad token where it has none: its end-of-text token.
    Padded batches need one (`tokenizer(texts, padding=True)`, pipelines); the attention mask,
    not the id, tells padding from text."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("pad_token") is None and settings.get("eos_token") is not None:
        settings["pad_token"] = settings["eos_token"]
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
