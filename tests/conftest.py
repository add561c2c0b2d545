"""Shared fixtures: paths to the shared data and tokenizer, and tiny configs.

The shared folder sits beside the repository (`../shared`), in CI as on the dev machines.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

if importlib.util.find_spec("mlx") is not None:
    import customllm_mlx  # noqa: F401  (first: preloads OpenBLAS before anything imports mlx.core)

import pytest

from customllm.config import ModelConfig

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"
COSMO2_DIR = SHARED_DIR / "tokenizers" / "cosmo2"
DATA_DIR = SHARED_DIR / "data"
COSMO2_VOCAB_SIZE = 49152
TRAIN_TXT = DATA_DIR / "tinystories" / "train.txt"
HELDOUT_TXT = DATA_DIR / "tinystories" / "heldout.txt"

# For test modules that train on the shared text with the real tokenizer:
# `from conftest import requires_training_data` and `pytestmark = requires_training_data`.
requires_training_data = pytest.mark.skipif(
    not (TRAIN_TXT.is_file() and (COSMO2_DIR / "tokenizer.json").is_file()),
    reason=f"shared data or tokenizer missing under {SHARED_DIR}",
)


def pytest_report_header(config) -> str | None:
    if importlib.util.find_spec("mlx") is None:
        return None
    blas = customllm_mlx._blas.loaded
    return f"MLX BLAS: {blas or 'its reference BLAS (no OpenBLAS found: MLX tests run slowly)'}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder not found: {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found: {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def cosmo2_path(shared_dir: Path) -> Path:
    """The cosmo2 (SmolLM) tokenizer folder, 49,152 tokens."""
    if not (COSMO2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"cosmo2 tokenizer not found: {COSMO2_DIR}")
    return COSMO2_DIR


@pytest.fixture
def tiny_config() -> ModelConfig:
    """The `tiny` preset with a 256-token vocabulary and a 64-token context: fast on CPU,
    every ratio of the 973M model kept (2 layers, 7 routed experts, top-2, dropout off)."""
    return ModelConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=64)


@pytest.fixture
def sharp_config(tiny_config: ModelConfig) -> ModelConfig:
    """`tiny_config` with weights N(0, 0.3): attention scores of order 1, so the rope angles,
    the cache and the absorbed projections move the logits (at N(0, 0.02) attention is
    nearly uniform, and a key left unrotated moved tiny's logits by less than 1e-6)."""
    return dataclasses.replace(tiny_config, initializer_range=0.3)


@pytest.fixture(scope="session")
def builtin_tokenizer(tmp_path_factory) -> Path:
    """A 512-token BPE tokenizer folder trained on the built-in corpus: needs no download and
    nothing outside the repository."""
    from customllm.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("builtin-tokenizer")
    train_tokenizer("builtin", 512, folder)
    return folder
