"""Shared fixtures: the test corpus and tokenizer, the optional shared data, and tiny configs.

The default suite needs nothing outside the repository. At import, this file writes the test
data from CPython's pydoc help topics (`pydoc_data.topics`, technical English that ships with
Python; every 10th topic held out), once per corpus version, into a cache folder under the system temp dir
(`customllm-test-data-<hash>`, the hash of the files' text and the tokenizer settings; written
in a scratch folder and renamed, so a half-written cache is never read):
  - `TRAIN_TXT` (`train.txt`): the paragraphs of the training topics, one document each,
    separated by lines `<|endoftext|>` (the `.txt` format the loader reads). About 2,400
    documents: the loader's hash split (`corpus.is_heldout`, 2%) holds out a few dozen of them.
    A held-out paragraph whose text also occurs in the training split (a repeated line such as
    "stop") is left out, so the two splits share no text;
  - `HELDOUT_TXT` (`heldout.txt`, beside it): the paragraphs of the held-out topics,
    the same format, again without text that occurs in the training split;
  - `TOKENIZER_DIR` (`tokenizer/`): a byte-level BPE of `TOKENIZER_VOCAB_SIZE` (4,096) tokens,
    `customllm.tokenizer.train_tokenizer` on the train split of `TRAIN_TXT` (cosmo2's
    pre-tokenizer and special tokens: id 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`).
Models with the 973M preset's 49,152-token vocabulary (`COSMO2_VOCAB_SIZE`) accept it too.

The shared folder beside the repository (`../shared`: TinyStories text and the 49,152-token
cosmo2 tokenizer) is optional: the tests about those files themselves take `requires_shared`,
which puts them in the slow set and skips them without the files. `CUSTOMLLM_SHARED_DIR=PATH`
points at another shared folder; a path that does not exist (e.g.
`CUSTOMLLM_SHARED_DIR=/nonexistent`) runs the suite as a bare clone of the repository would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

if importlib.util.find_spec("mlx") is not None:
    import customllm_mlx

    customllm_mlx.setup_cpu()  # first: OpenBLAS before anything imports mlx.core

import pytest

from customllm.config import ModelConfig
from customllm.corpus import DOC_SEPARATOR, is_heldout

REPO_DIR = Path(__file__).resolve().parents[1]

# --- the optional shared folder -------------------------------------------------------------
SHARED_DIR = Path(os.environ.get("CUSTOMLLM_SHARED_DIR") or REPO_DIR.parent / "shared")
COSMO2_DIR = SHARED_DIR / "tokenizers" / "cosmo2"
COSMO2_VOCAB_SIZE = 49152
TINYSTORIES_DIR = SHARED_DIR / "data" / "tinystories"

_shared_present = pytest.mark.skipif(
    not ((COSMO2_DIR / "tokenizer.json").is_file() and (TINYSTORIES_DIR / "train.txt").is_file()),
    reason=f"optional: the cosmo2 tokenizer and TinyStories are not under {SHARED_DIR}",
)


def requires_shared(test):
    """For tests about the shared files themselves (the real cosmo2 tokenizer, TinyStories): in
    the slow set, so the default suite never skips for data a clone does not have."""
    return pytest.mark.slow(_shared_present(test))


# --- the test corpus and tokenizer, built from the repository alone ------------------------
TOKENIZER_VOCAB_SIZE = 4096
_TEST_DATA_FORMAT = 1  # bump when the files below are written differently


def _paragraphs(documents) -> list[str]:
    """Every non-empty blank-line-separated paragraph of `documents`, stripped, in order."""
    parts = (p.strip() for doc in documents for p in re.split(r"\n[ \t]*\n", doc))
    return [p for p in parts if p]


def _topics(heldout: bool) -> list[str]:
    """pydoc's help topics in sorted-key order, repeats dropped, every 10th held out."""
    from pydoc_data.topics import topics

    texts = [t for t in dict.fromkeys(topics[key].strip() for key in sorted(topics)) if t]
    return [t for i, t in enumerate(texts) if (i % 10 == 0) == heldout]


def _test_documents() -> tuple[list[str], list[str]]:
    """The documents of train.txt and of heldout.txt (see the module docstring)."""
    train = _paragraphs(_topics(heldout=False))
    heldout = _paragraphs(_topics(heldout=True))
    trained_on = f"\n{DOC_SEPARATOR}\n".join(p for p in train if not is_heldout(p))
    train = [p for p in train if not (is_heldout(p) and p in trained_on)]
    heldout = [p for p in heldout if p not in trained_on]
    for doc in train + heldout:
        assert not re.search(rf"(?m)^{re.escape(DOC_SEPARATOR)}$", doc), doc[:80]
    return train, heldout


def _txt(documents: list[str]) -> str:
    return "".join(f"{doc}\n{DOC_SEPARATOR}\n" for doc in documents)


def _build_test_data() -> tuple[Path, int, int]:
    """The cache folder holding train.txt, heldout.txt and tokenizer/ (built when missing),
    and the number of documents in each text file."""
    import tokenizers

    train, heldout = _test_documents()
    texts = {"train.txt": _txt(train), "heldout.txt": _txt(heldout)}
    key = hashlib.sha256()
    for part in (
        str(_TEST_DATA_FORMAT),
        str(TOKENIZER_VOCAB_SIZE),
        tokenizers.__version__,
        *texts.values(),
    ):
        key.update(part.encode("utf-8") + b"\0")
    folder = Path(tempfile.gettempdir()) / f"customllm-test-data-{key.hexdigest()[:16]}"
    if not folder.is_dir():
        from customllm.tokenizer import train_tokenizer

        scratch = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        scratch.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from other users
        try:
            for name, text in texts.items():
                (scratch / name).write_text(text, encoding="utf-8")
            tokenizer = train_tokenizer(
                scratch / "train.txt", TOKENIZER_VOCAB_SIZE, scratch / "tokenizer"
            )
            if len(tokenizer) != TOKENIZER_VOCAB_SIZE:
                raise RuntimeError(
                    f"the test tokenizer has {len(tokenizer)} tokens, not "
                    f"{TOKENIZER_VOCAB_SIZE}: the built-in corpus is too small for it"
                )
            try:
                scratch.rename(folder)
            except OSError:  # another pytest process built it first
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder, len(train), len(heldout)


TEST_DATA_DIR, TRAIN_DOCS, HELDOUT_DOCS = _build_test_data()
TRAIN_TXT = TEST_DATA_DIR / "train.txt"  # TRAIN_DOCS documents
HELDOUT_TXT = TEST_DATA_DIR / "heldout.txt"  # HELDOUT_DOCS documents, beside train.txt
TOKENIZER_DIR = TEST_DATA_DIR / "tokenizer"  # TOKENIZER_VOCAB_SIZE tokens


def pytest_report_header(config) -> str | None:
    lines = [f"test data: {TEST_DATA_DIR}"]
    if importlib.util.find_spec("mlx") is not None:
        blas = customllm_mlx._blas.loaded
        reference = "its reference BLAS (no OpenBLAS found: MLX tests run slowly)"
        lines.append(f"MLX BLAS: {blas or reference}")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The test tokenizer folder (`TOKENIZER_DIR`, `TOKENIZER_VOCAB_SIZE` tokens)."""
    return TOKENIZER_DIR


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
