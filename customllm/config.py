"""Model configuration: one dataclass, the presets, and a JSON round trip (config.json)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "customllm"
KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
# What a complete config.json written before these fields existed trained with
LEGACY_DEFAULTS = {"bias_update": "sign", "router_lr_scale": 1.0}
# Fields added since, with the value a complete config.json without them was trained with
ADDED_FIELDS = {"embedding_init_std": 0.02}
DERIVED_FIELDS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# Keys of transformers' configs (DeepseekV3, Llama) that lie near a field name: kept as extra
FOREIGN_KEYS = ("head_dim", "qk_head_dim", "moe_intermediate_size", "attention_dropout")


@dataclass
class ModelConfig:
    """Every field of docs/architecture.md; the defaults are the 973M preset."""

    vocab_size: int = 49152
    hidden_size: int = 768
    num_hidden_layers: int = 30
    num_attention_heads: int = 12
    q_latent_dim: int = 192
    kv_latent_dim: int = 192
    qk_nope_head_dim: int | None = None  # derived: (hidden_size / 2) / heads
    qk_rope_head_dim: int | None = None  # derived: (hidden_size / 2) / heads
    v_head_dim: int | None = None  # derived: hidden_size / heads
    intermediate_size: int = 1536
    n_shared_experts: int = 1
    n_routed_experts: int = 7
    num_experts_per_tok: int = 2
    router_score: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.0  # = top-k: the routed experts weigh as a dense layer's
    bias_update: str = (
        "solve"  # "solve": toward the bias that balances the batch; "sign": fixed step
    )
    bias_update_rate: float = (
        0.2  # solve: least share of the way per step (+ MaxVio); sign: the step
    )
    router_lr_scale: float = 0.1  # the router's learning rate, as a multiple of --lr
    aux_loss_coef: float = 1e-4
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    embd_dropout: float = 0.1
    attn_dropout: float = 0.3
    mlp_dropout: float = 0.3
    lm_head_bias: bool = True
    initializer_range: float = 0.02
    # the token embeddings' init, wider than the matrices' so tokens stay apart (architecture.md)
    embedding_init_std: float = 1.0
    eos_token_id: int = 0
    bos_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check_types()
        heads = self.num_attention_heads
        if heads <= 0:
            raise ValueError(f"num_attention_heads must be positive, got {heads}")
        half = self.hidden_size // 2
        for name, width in (
            ("qk_nope_head_dim", half),
            ("qk_rope_head_dim", half),
            ("v_head_dim", self.hidden_size),
        ):
            # derived from the head count, also where config.json stores it (an edited
            # num_attention_heads must not keep the old head dims and change the widths)
            if width % heads:
                raise ValueError(
                    f"num_attention_heads={heads} does not divide the {width}-wide "
                    f"projections of hidden_size={self.hidden_size} ({name} would be "
                    f"{width / heads:g}); choose a head count that divides {width}"
                )
            value = getattr(self, name)
            if value is None:
                setattr(self, name, width // heads)
            elif value != width // heads:
                raise ValueError(
                    f"{name}={value!r} does not match hidden_size={self.hidden_size} and "
                    f"num_attention_heads={heads}: it is {width} / heads = {width // heads} "
                    f"(leave it out, or null, to derive it)"
                )
        self.validate()

    def check_types(self) -> None:
        """Raise ValueError naming the first field whose JSON value has the wrong type (a
        string "64", null, a float for an integer): the arithmetic on it would fail later with
        a TypeError that names nothing."""
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
        for f in dataclasses.fields(self):
            kind, _, optional = f.type.partition(" | ")
            value = getattr(self, f.name)
            if kind not in kinds or (optional == "None" and value is None):
                continue
            if not isinstance(value, kinds[kind]) or (kind != "bool" and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {KIND_NAMES[kind]}, got {value!r}")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = (
            "vocab_size hidden_size num_hidden_layers q_latent_dim kv_latent_dim qk_nope_head_dim "
            "qk_rope_head_dim v_head_dim intermediate_size num_experts_per_tok "
            "max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.n_shared_experts not in (0, 1):
            raise ValueError(f"n_shared_experts must be 0 or 1, got {self.n_shared_experts}")
        if not isinstance(self.n_routed_experts, int) or self.n_routed_experts < 0:
            raise ValueError(
                f"n_routed_experts must be 0 (a dense model) or more, got {self.n_routed_experts!r}"
            )
        if self.n_routed_experts == 0 and self.n_shared_experts == 0:
            raise ValueError("a model needs an expert: n_shared_experts=1 or n_routed_experts > 0")
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"n_routed_experts={self.n_routed_experts}"
            )
        if self.router_score not in ("sigmoid", "softmax"):
            raise ValueError(
                f"router_score must be 'sigmoid' or 'softmax', got {self.router_score!r}"
            )
        for name in ("embd_dropout", "attn_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in (
            "rms_norm_eps",
            "rope_theta",
            "routed_scaling_factor",
            "initializer_range",
            "embedding_init_std",
        ):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.bias_update not in ("solve", "sign"):
            raise ValueError(f"bias_update must be 'solve' or 'sign', got {self.bias_update!r}")
        if self.bias_update == "solve" and not 0 < self.bias_update_rate <= 1:
            raise ValueError(
                f"bias_update_rate must be in (0, 1] with bias_update 'solve' (the share of the "
                f"way to the balancing bias taken per step), got {self.bias_update_rate!r}"
            )
        for name in ("bias_update_rate", "aux_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(
                    f"{name} must be finite and not negative, got {getattr(self, name)!r}"
                )
        if not 0 < self.router_lr_scale < math.inf:
            raise ValueError(f"router_lr_scale must be positive, got {self.router_lr_scale!r}")
        for name in ("eos_token_id", "bos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name} must be a token id below vocab_size={self.vocab_size}, "
                    f"got {getattr(self, name)}"
                )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_numbers_per_token(self) -> int:
        """Numbers cached per token and layer: c_kv plus the rotated per-head k_rope."""
        return self.kv_latent_dim + self.num_attention_heads * self.qk_rope_head_dim

    def num_parameters(self) -> int:
        """Trainable parameters, computed from the shapes (expert_bias excluded)."""
        d, h = self.hidden_size, self.num_attention_heads
        attn = (
            d * self.kv_latent_dim
            + d * self.q_latent_dim
            + self.kv_latent_dim * h * self.qk_nope_head_dim
            + self.kv_latent_dim * h * self.v_head_dim
            + self.q_latent_dim * h * self.qk_nope_head_dim
            + d * h * self.qk_rope_head_dim
            + self.q_latent_dim * h * self.qk_rope_head_dim
            + h * self.v_head_dim * d
        )
        experts = (self.n_shared_experts + self.n_routed_experts) * 3 * d * self.intermediate_size
        layer = attn + experts + d * self.n_routed_experts + 2 * d
        head = d * self.vocab_size + (self.vocab_size if self.lm_head_bias else 0)
        embeddings = (self.vocab_size + self.max_position_embeddings) * d
        return embeddings + self.num_hidden_layers * layer + head

    # Presets and JSON ----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; unknown keys (model_type, architectures...) go to extra."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = with_legacy_defaults(values)
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        for key in extra:  # a misspelt field would be dropped and its default used
            near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.85)
            if near and key not in FOREIGN_KEYS:
                raise ValueError(f"unknown field {key!r}: did you mean {near[0]!r}?")
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object")
        check_complete(values, str(path))
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        values = {**self.extra, **dataclasses.asdict(self)}
        values.pop("extra")
        values["model_type"] = MODEL_TYPE
        return values

    def to_json(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True))


def check_complete(values: dict[str, Any], source: str) -> None:
    """A model's config.json lists every field (the derived head dims may be left out): raise
    ValueError naming the missing ones, so that none falls back to the 973m preset's value
    unseen. Fields added later (LEGACY_DEFAULTS) may be missing from a file written before."""
    legacy = "bias_update_rate" in values and "bias_update" not in values
    missing = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in values
        and f.name not in (*DERIVED_FIELDS, "extra")
        and not (legacy and f.name in LEGACY_DEFAULTS)
        and f.name not in ADDED_FIELDS
    ]
    if missing:
        raise ValueError(
            f"{source} lacks {', '.join(missing[:4])}"
            + (" ..." if len(missing) > 4 else "")
            + ": a model's config.json lists every field; start from a complete one "
            "(ModelConfig.from_preset(NAME).to_json(PATH), or the config.json of a model folder)"
        )


def with_legacy_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with what a config.json written before LEGACY_DEFAULTS' or ADDED_FIELDS' fields
    trained with (a complete one: it has initializer_range; a dict of overrides keeps defaults)."""
    if "bias_update_rate" in values and "bias_update" not in values:
        values = {**LEGACY_DEFAULTS, **values}
    if "initializer_range" in values:
        values = {**ADDED_FIELDS, **values}
    return values


PRESETS: dict[str, dict[str, Any]] = {
    "973m": {},
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        q_latent_dim=64,
        kv_latent_dim=64,
        intermediate_size=512,
        max_position_embeddings=1024,
        embd_dropout=0.0,
        attn_dropout=0.0,
        mlp_dropout=0.0,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_latent_dim=16,
        kv_latent_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        router_lr_scale=0.03,  # hidden 64: a shorter collapse phase than at 0.1 (quality.md)
        embd_dropout=0.0,
        attn_dropout=0.0,
        mlp_dropout=0.0,
    ),
}
