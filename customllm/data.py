"""The tokenize-and-pack stream used for training and eval, and its exact resume.

Packing. Each document (see `customllm.corpus` for sources, document splitting and the held-out
split) is tokenized, batch-encoded in chunks with the fast tokenizer, and followed by EOS; the
token stream is cut into blocks of `seq_len + 1` ids with no padding, the leftover carrying over
into the next block (and across epochs).

Resume. `StreamDataset.state_dict()` records the first document whose tokens are not all in a
block yet (epoch, file, document index), how many of its tokens are, the block counters, the
shuffle buffer and its RNG state. Restoring re-reads from that document, so no token buffer is
stored and resuming costs at most one re-read of the current file.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from customllm.corpus import (
    HELDOUT_FRACTION,
    SPLITS,
    DataSource,
    is_heldout,
    iter_documents,
    parse_source,
    positioned_documents,
    require_hub,
)
from customllm.tokenizer import eos_token_id

__all__ = [
    "DEFAULT_HUB_DATA",
    "HELDOUT_FRACTION",
    "DataSource",
    "StreamDataset",
    "eval_batches",
    "is_heldout",
    "iter_documents",
    "parse_source",
]

DEFAULT_HUB_DATA = "HuggingFaceTB/smollm-corpus:cosmopedia-v2"
STATE_VERSION = 1

_CHUNK_DOCS = 256  # documents per batch-encode call
_CHUNK_CHARS = 1 << 20


# --- the packed token stream -------------------------------------------------------------------


class StreamDataset:
    """Tokenize documents on the fly and pack them into blocks of `seq_len + 1` token ids.

    Blocks are int32 arrays with no padding. `shuffle_buffer > 0` shuffles blocks through a buffer
    of that many, seeded by (seed, rank). `loop=True` restarts the corpus at its end (the epoch
    counter goes up). Rank r of `world_size` takes blocks r, r + world_size, ... of the stream.
    `state_dict()` / `load_state_dict()` resume exactly where the stream stopped.
    """

    def __init__(
        self,
        source: str | Path | DataSource,
        tokenizer: Any,
        seq_len: int,
        *,
        text_column: str = "text",
        shuffle_buffer: int = 0,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = HELDOUT_FRACTION,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if shuffle_buffer < 0 or not 0.0 <= heldout_fraction < 1.0:
            raise ValueError("shuffle_buffer must be >= 0 and heldout_fraction in [0, 1)")
        self.source = source if isinstance(source, DataSource) else parse_source(source)
        if self.source.heldout_files and split != "all":  # split by file, not by document
            files = self.source.files if split == "train" else self.source.heldout_files
            self.source = dataclasses.replace(self.source, files=files, heldout_files=())
            split = "all"
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_column = text_column
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.rank = rank
        self.world_size = world_size
        self.loop = loop
        self.eos_id = eos_token_id(tokenizer)
        if self.source.kind == "hub":
            require_hub(self.source)  # fail at startup, not at the first batch
        self._rng = np.random.default_rng([seed, rank])
        self._shuffle: list[np.ndarray] = []
        self._blocks_read = 0  # blocks cut from the stream, all ranks
        self._blocks_yielded = 0  # blocks this rank handed out
        self._exhausted = False
        self._seek(epoch=0, file=0, doc=0, offset=0)

    def _seek(self, epoch: int, file: int, doc: int, offset: int) -> None:
        """Read on from document (epoch, file, doc), whose first `offset` tokens are packed."""
        self._docs = self._document_stream(epoch, file, doc)
        self._pending = np.empty(0, dtype=np.int32)
        self._pending_docs: deque[list[int]] = deque()  # [epoch, file, doc, used, total]
        self._next_position = (epoch, file, doc)
        self._skip = offset

    def _document_stream(self, epoch: int, file: int, doc: int) -> Iterator[tuple[int, ...]]:
        while True:
            count = 0
            for f, d, text in positioned_documents(
                self.source, self.text_column, self.split, self.heldout_fraction, file, doc
            ):
                count += 1
                yield epoch, f, d, text
            if count == 0 and (file, doc) == (0, 0):
                raise ValueError(self._empty_message())
            if not self.loop:
                return
            epoch, file, doc = epoch + 1, 0, 0

    def _empty_message(self) -> str:
        any_document = positioned_documents(
            self.source, self.text_column, "all", self.heldout_fraction, 0, 0
        )
        if self.split == "all" or next(iter(any_document), None) is None:
            return f"empty corpus: no documents (no text that is not blank) in {self.source.spec}"
        return (
            f"empty corpus: no {self.split} documents in {self.source.spec} "
            f"(held-out fraction {self.heldout_fraction}); give an eval source or more data"
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", self.tokenizer)
        if hasattr(backend, "encode_batch"):
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _fill(self) -> bool:
        """Tokenize the next chunk of documents onto the pending buffer; False at the end."""
        chunk, chars = [], 0
        for item in self._docs:
            chunk.append(item)
            chars += len(item[3])
            if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
                break
        if not chunk:
            return False
        flat: list[int] = []
        for (epoch, file, doc, _), ids in zip(
            chunk, self._encode([c[3] for c in chunk]), strict=True
        ):
            ids.append(self.eos_id)
            used, self._skip = self._skip, 0  # only the first document after a restore
            flat.extend(ids[used:])
            self._pending_docs.append([epoch, file, doc, used, len(ids)])
        epoch, file, doc, _ = chunk[-1]
        self._next_position = (epoch, file, doc + 1)
        self._pending = np.concatenate([self._pending, np.array(flat, dtype=np.int32)])
        return True

    def _consume(self, count: int) -> None:
        while count:
            head = self._pending_docs[0]
            take = min(count, head[4] - head[3])
            head[3] += take
            count -= take
            if head[3] == head[4]:
                self._pending_docs.popleft()

    def _next_raw_block(self) -> np.ndarray | None:
        length = self.seq_len + 1
        while len(self._pending) < length:
            if not self._fill():
                return None  # end of a non-looping stream; a short tail is dropped
        block = self._pending[:length].copy()
        self._pending = self._pending[length:]
        self._consume(length)
        self._blocks_read += 1
        return block

    def _next_rank_block(self) -> np.ndarray | None:
        while (block := self._next_raw_block()) is not None:
            if (self._blocks_read - 1) % self.world_size == self.rank:
                return block
        return None

    def _next_block(self) -> np.ndarray | None:
        if self.shuffle_buffer == 0:
            block = self._next_rank_block()
        else:
            while not self._exhausted and len(self._shuffle) < self.shuffle_buffer:
                incoming = self._next_rank_block()
                if incoming is None:
                    self._exhausted = True
                else:
                    self._shuffle.append(incoming)
            block = None
            if self._shuffle:
                pick = int(self._rng.integers(len(self._shuffle)))
                block = self._shuffle[pick]
                self._shuffle[pick] = self._shuffle[-1]
                self._shuffle.pop()
        if block is None and self._blocks_yielded == 0:
            raise ValueError(
                f"corpus too small: {self.source.spec} ({self.split} split) gives no block of "
                f"seq_len + 1 = {self.seq_len + 1} tokens for rank {self.rank}"
            )
        if block is not None:
            self._blocks_yielded += 1
        return block

    def __iter__(self) -> Iterator[np.ndarray]:
        while (block := self._next_block()) is not None:
            yield block

    def next_batch(self, batch_size: int) -> np.ndarray:
        """(batch_size, seq_len + 1) int32; fewer rows (maybe 0) only at a non-looping end."""
        blocks = []
        while len(blocks) < batch_size and (block := self._next_block()) is not None:
            blocks.append(block)
        if not blocks:
            return np.empty((0, self.seq_len + 1), dtype=np.int32)
        return np.stack(blocks)

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be packed (0 during the first pass)."""
        return self._pending_docs[0][0] if self._pending_docs else self._next_position[0]

    def _files(self) -> list[list[Any]]:
        """[name, size in bytes] of each local file: the stream's positions index this list."""
        root = Path(self.source.spec)
        root = root if root.is_dir() else root.parent
        return [
            [str(p.relative_to(root)) if p.is_relative_to(root) else str(p), p.stat().st_size]
            for p in (Path(f).absolute() for f in self.source.files)
        ]

    def _identity(self) -> dict[str, Any]:
        return {
            "source": self.source.spec,
            "files": self._files(),
            "seq_len": self.seq_len,
            "split": self.split,
            "text_column": self.text_column,
            "heldout_fraction": self.heldout_fraction,
            "shuffle_buffer": self.shuffle_buffer,
            "rank": self.rank,
            "world_size": self.world_size,
            "eos_id": self.eos_id,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position: first unfinished document, shuffle buffer and RNG."""
        if self._pending_docs:
            epoch, file, doc, offset, _ = self._pending_docs[0]
        else:
            (epoch, file, doc), offset = self._next_position, self._skip
        shuffle = np.stack(self._shuffle).astype("<i4").tobytes() if self._shuffle else b""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": epoch,
            "file": file,
            "doc": doc,
            "offset": offset,
            "blocks_read": self._blocks_read,
            "blocks_yielded": self._blocks_yielded,
            "rng": self._rng.bit_generator.state,
            "shuffle": base64.b64encode(shuffle).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')!r}")
        identity = self._identity()
        files = identity.pop("files")
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in identity.items()
            if state.get(key) != value
        ]
        if mismatched:
            raise ValueError(
                "data state belongs to a different stream (" + "; ".join(mismatched) + ")"
            )
        # a state saved before file lists were kept has none to compare
        if "files" in state and state["files"] != files:
            raise ValueError(
                "the --data files changed since the checkpoint: "
                f"{_files_changed(state['files'], files)}; the saved position would point into "
                "another stream. Restore the files to resume exactly, or start a new run from "
                "these weights with --init CHECKPOINT"
            )
        self._seek(state["epoch"], state["file"], state["doc"], state["offset"])
        self._blocks_read = state["blocks_read"]
        self._blocks_yielded = state["blocks_yielded"]
        self._rng.bit_generator.state = state["rng"]
        shuffle = np.frombuffer(base64.b64decode(state["shuffle"]), dtype="<i4")
        self._shuffle = list(shuffle.reshape(-1, self.seq_len + 1).astype(np.int32))
        self._exhausted = False


def _files_changed(saved: list, now: list) -> str:
    """What differs between two [name, size] lists, in words."""
    before, after = dict(map(tuple, saved)), dict(map(tuple, now))
    parts = [f"added {n}" for n in after if n not in before]
    parts += [f"removed {n}" for n in before if n not in after]
    parts += [
        f"{n} was {before[n]:,} bytes, now {after[n]:,}"
        for n in after
        if n in before and before[n] != after[n]
    ]
    return ", ".join(parts) or "the files' order"


def eval_batches(
    eval_source: str | Path | DataSource | None,
    train_source: str | Path | DataSource | None,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    *,
    max_batches: int | None = None,
    text_column: str = "text",
    heldout_fraction: float = HELDOUT_FRACTION,
    rank: int = 0,
    world_size: int = 1,
) -> list[np.ndarray]:
    """The fixed eval set: all of `eval_source` if given, else the held-out split of
    `train_source` (documents the training stream never yields). The last batch may be short.
    A hub source needs `max_batches` (reading a whole hub stream would never end in practice)."""
    if eval_source is not None:
        source, split = eval_source, "all"
    elif train_source is not None:
        source, split = train_source, "heldout"
    else:
        raise ValueError("eval_batches needs an eval source or a training source to hold out from")
    source = source if isinstance(source, DataSource) else parse_source(source)
    if source.kind == "hub" and max_batches is None:
        raise ValueError(f"evaluating on hub dataset {source.spec!r} needs max_batches")
    stream = StreamDataset(
        source,
        tokenizer,
        seq_len,
        text_column=text_column,
        split=split,
        heldout_fraction=heldout_fraction,
        rank=rank,
        world_size=world_size,
        loop=False,
    )
    batches: list[np.ndarray] = []
    while max_batches is None or len(batches) < max_batches:
        batch = stream.next_batch(batch_size)
        if len(batch) == 0:
            break
        batches.append(batch)
    return batches
