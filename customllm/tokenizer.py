"""Tokenizer loading and training, framework-free.

`load_tokenizer` returns a `transformers` fast tokenizer from a local folder, a hub id or
`builtin` (a BPE of the built-in stories, trained on first use into the user's cache);
`train_tokenizer` trains a byte-level BPE on local text and saves a folder that
`AutoTokenizer.from_pretrained` loads. `transformers` is imported lazily (it pulls in torch when
torch is installed), so importing this module stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from customllm.corpus import iter_documents
from customllm.hub import hub_unreachable_reason, looks_like_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_TOKENIZER = "HuggingFaceTB/cosmo2-tokenizer"
BUILTIN_TOKENIZER = "builtin"  # the default for --data builtin: no download
BUILTIN_VOCAB_SIZE = 1024  # at most: the merges run out at 938, every word one token
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 after training


def _load_local(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer folder not found: {path} (pass a folder holding tokenizer.json, "
            f"or a hub id such as {DEFAULT_TOKENIZER})"
        )
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is a file; pass the folder holding tokenizer.json")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(
            f"{path} is not a tokenizer folder: no tokenizer.json or tokenizer_config.json "
            f"(found {found})"
        )
    if (path / "tokenizer.json").exists():
        # Straight to the fast class: AutoTokenizer would read a model folder's config.json
        # (model_type customllm) and warn that it does not know the type.
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception as err:  # a damaged file: the tokenizers/json message names no file
            raise ValueError(f"cannot read the tokenizer in {path}: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"cannot read the tokenizer in {path}: {err}") from err
    return _require_fast(tokenizer, str(path))


def _load_hub(name: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    reason = hub_unreachable_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=False, local_files_only=reason is not None
        )
    except OSError as e:
        why = f"the hub is unreachable ({reason}) and it is not cached" if reason else str(e)
        raise OSError(
            f"cannot load tokenizer {name!r}: {why}. Pass a local tokenizer folder instead "
            f"(one with tokenizer.json)."
        ) from e
    return _require_fast(tokenizer, name)


def _require_fast(tokenizer: object, where: str) -> PreTrainedTokenizerFast:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{where} has no fast (tokenizers) backend; a tokenizer.json is needed")
    return tokenizer  # type: ignore[return-value]


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_TOKENIZER) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local folder or a hub id (never runs remote code).

    A string that looks like a path (starts with `.`, `/` or `~`, or whose first component
    exists) never falls through to the hub: a missing folder raises FileNotFoundError naming it.
    """
    name = os.fspath(name_or_path)
    if name == BUILTIN_TOKENIZER:
        return _load_local(builtin_tokenizer_dir())
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(name):
        return _load_local(path)
    return _load_hub(name)


def eos_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The end-of-text id appended after each document: `eos_token_id`, else `<|endoftext|>`."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return int(eos)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    eos = backend.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer has no eos token and no {EOS_TOKEN!r} in its vocabulary")
    return int(eos)


def train_tokenizer(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    text_column: str = "text",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (cosmo2-style pre-tokenizer) and save it as a tokenizer folder.

    `files` is one or more data sources as `--data` accepts them (files, folders, globs,
    `builtin`); only their training split is read. Special tokens: <|endoftext|> (id 0, also
    bos/eos/unk), <|im_start|>, <|im_end|>. Returns the saved folder loaded back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (256 bytes + special tokens)")
    sources = [files] if isinstance(files, str | os.PathLike) else list(files)
    if not sources:
        raise ValueError("train_tokenizer needs at least one file")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterable[str]:
        for source in sources:
            yield from iter_documents(os.fspath(source), text_column=text_column, split="train")

    tokenizer.train_from_iterator(texts(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return load_tokenizer(out.resolve())


def builtin_tokenizer_dir() -> Path:
    """The folder of the built-in tokenizer: a BPE of up to `BUILTIN_VOCAB_SIZE` tokens trained
    on the built-in stories' training split, cached under $XDG_CACHE_HOME (else ~/.cache)/customllm
    and keyed by the story generator's source, so a changed corpus gets a new tokenizer."""
    import hashlib

    import tokenizers

    import customllm.stories
    from customllm.checkpoint import atomic_folder

    key = hashlib.sha256(Path(customllm.stories.__file__).read_bytes())
    key.update(f"{BUILTIN_VOCAB_SIZE} {tokenizers.__version__}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "customllm"
    folder = cache / f"builtin-tokenizer-{key.hexdigest()[:16]}"
    if not (folder / "tokenizer.json").is_file():
        with atomic_folder(folder) as scratch:  # a half-written folder is never read
            train_tokenizer("builtin", BUILTIN_VOCAB_SIZE, scratch)
    return folder


def load_folder_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved in a model folder, or None when the folder holds no tokenizer files."""
    from customllm.checkpoint import TOKENIZER_FILES

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)
