"""A hub-ready model folder from a checkpoint: `customllm-torch export` / `customllm-mlx export`.

The folder holds what a user of the hub needs and nothing a training run left (no optimizer
state, no training state): config.json with `auto_map`, model.safetensors, the tokenizer (with a
pad token), generation_config.json, a model card (README.md), `modeling_customllm.py` (the
PyTorch model in one file, so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works where this package is not installed) and mlx_lm's model file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from customllm.checkpoint import (
    CONFIG_NAME,
    MLX_LM_SHIM,
    MLX_LM_SHIM_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    atomic_folder,
    check_not_quantized,
    find_weights_file,
    with_pad_token,
)
from customllm.config import ModelConfig

MODELING_NAME = "modeling_customllm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_customllm.CustomLLMConfig",
    "AutoModelForCausalLM": "modeling_customllm.CustomLLM",
}
# the sources bundled into MODELING_NAME, in dependency order, and the imports among them
BUNDLED = ("customllm/config.py", "customllm_torch/loss.py", "customllm_torch/model.py")
PACKAGE_IMPORT = re.compile(
    r"^from (customllm|customllm_torch)(\.\w+)* import \(?[^)]*?\)?\n", re.M
)
REPO_DIR = Path(__file__).resolve().parents[1]


def modeling_source() -> str:
    """The PyTorch model as one module that imports only torch, transformers and the standard
    library: config.py, loss.py and model.py with the imports among them removed."""
    parts = []
    for name in BUNDLED:
        text = (REPO_DIR / name).read_text(encoding="utf-8")
        text = PACKAGE_IMPORT.sub("", text).replace("from __future__ import annotations\n", "")
        parts.append(f"# --- {name} " + "-" * (92 - len(name)) + "\n" + text)
    header = (
        '"""CustomLLM for transformers, in one file (written by `customllm-torch export` from the\n'
        "customllm package). Load with AutoModelForCausalLM.from_pretrained(folder,\n"
        'trust_remote_code=True)."""\n\nfrom __future__ import annotations\n\n'
    )
    return header + "\n\n".join(parts)


def export_folder(src: str | Path, dst: str | Path, framework: str) -> Path:
    """Write the hub-ready folder `dst` from the model folder or checkpoint `src`."""
    src, dst = Path(src), Path(dst)
    config = ModelConfig.from_json(src / CONFIG_NAME)
    check_not_quantized(config, str(src))
    weights = find_weights_file(src)
    state = _read_json(src / "training_state.json")
    with atomic_folder(dst) as tmp:
        shutil.copy2(weights, tmp / WEIGHTS_NAME)
        (tmp / WEIGHTS_NAME).chmod(0o644)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        with_pad_token(tmp)
        config.to_json(
            tmp / CONFIG_NAME,
            architectures=["CustomLLM"],
            model_file=MLX_LM_SHIM_NAME,
            auto_map=AUTO_MAP,
        )
        (tmp / MLX_LM_SHIM_NAME).write_text(MLX_LM_SHIM)
        (tmp / MODELING_NAME).write_text(modeling_source(), encoding="utf-8")
        generation = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, state, dst.name, framework))
    return dst


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def model_card(config: ModelConfig, state: dict, name: str, framework: str) -> str:
    """README.md: what the model is, how it was trained, how to load it."""
    train = state.get("train_config", {})
    params, active = config.num_parameters(), active_parameters(config)
    trained = "-"
    if state.get("tokens_seen"):
        trained = (
            f"{state['tokens_seen']:,} tokens in {state.get('step', '?')} steps "
            f"({state.get('framework', framework)}), data `{train.get('data') or 'builtin'}`"
        )
    losses = [
        f"{label} {state[key]:.4f}"
        for key, label in (("loss", "training"), ("eval_loss", "held-out"))
        if isinstance(state.get(key), int | float)
    ]
    experts = (
        f"1 shared + {config.n_routed_experts} routed SwiGLU experts, top-"
        f"{config.num_experts_per_tok} by sigmoid scores with a balancing bias"
        if config.n_routed_experts
        else "one dense SwiGLU"
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [customllm, mixture-of-experts, mla, mlx]
---

# {name}

A CustomLLM language model: a decoder of {config.num_hidden_layers} layers, multi-head latent
attention ({config.num_attention_heads} heads, a {config.kv_latent_dim}-wide key-value latent) and
a mixture of experts per layer ({experts}).

| | |
|---|---|
| parameters | {params:,} ({active:,} active per token) |
| hidden size / vocabulary / context | {config.hidden_size} / {config.vocab_size:,} / {config.max_position_embeddings:,} |
| trained on | {trained} |
| last loss | {", ".join(losses) or "-"} |

## Use

transformers (no other package needed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
out = model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=40)
print(tokenizer.decode(out[0]))
```

With the customllm package installed, `import customllm_torch` registers the model with the
Auto classes (no `trust_remote_code`), and `customllm-torch generate --model {name} -p "..."`
runs it.

MLX (`pip install customllm[mlx]`): `customllm-mlx generate --model {name} -p "..."`, or mlx_lm:

```python
import mlx_lm
model, tokenizer = mlx_lm.load("{name}", trust_remote_code=True)
print(mlx_lm.generate(model, tokenizer, "Once upon a time", max_tokens=40))
```
"""


def active_parameters(config: ModelConfig) -> int:
    """Parameters a token passes through: all but the routed experts it does not pick."""
    expert = 3 * config.hidden_size * config.intermediate_size
    unused = config.n_routed_experts - config.num_experts_per_tok
    return config.num_parameters() - config.num_hidden_layers * max(unused, 0) * expert
