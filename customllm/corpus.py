"""Where text comes from: `--data` sources and the documents they hold, framework-free.

A `--data` string is one of:
  - `builtin`: 20,000 short children's stories written by a seeded grammar
    (`customllm.stories`), so the quick start needs no download and a small model soon writes
    text that reads like it;
  - a local path: a `.txt`, `.jsonl` or `.parquet` file, a folder (every such file below it,
    sorted by path) or a glob pattern;
  - a hub dataset `name[:config]`, streamed with `datasets` (e.g. `data.DEFAULT_HUB_DATA`).

Documents. In a `.txt` file, lines that are exactly `<|endoftext|>` separate documents when the
file has any; otherwise every blank-line-separated paragraph is a document. Surrounding whitespace
is stripped and empty documents are skipped. `.jsonl` / `.parquet` / hub rows give one document
each, from the `text_column` field.

Held-out split. For `builtin`, every 10th story (numbers 0, 10, ...; 2,000 stories) is held
out. For every other source a document is held out when a stable hash of its text (blake2b)
falls in the first `heldout_fraction` of the hash range; the `train` split skips exactly those
documents, so eval never sees training text (identical documents always land on the same side).
On a hub stream the held-out split reads about 1/heldout_fraction times more text than it
keeps, so cap its eval batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customllm.hub import hub_unreachable_reason, looks_like_path
from customllm.stories import N_STORIES, story

BUILTIN = "builtin"  # the `--data` value that selects the built-in corpus
BUILTIN_HELDOUT_EVERY = 10
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"
HELDOUT_FRACTION = 0.02
SPLITS = ("all", "train", "heldout")

_SEPARATOR_LINE = re.compile(rb"(?m)^<\|endoftext\|>\r?$")
_HASH_BUCKETS = 10_000
_DATA_HINT = "Use --data PATH with local .txt/.jsonl/.parquet files, or --data builtin"


def is_builtin_heldout(index: int) -> bool:
    """Whether built-in document number `index` belongs to the held-out split."""
    return index % BUILTIN_HELDOUT_EVERY == 0


def builtin_documents(split: str = "all") -> Iterator[str]:
    """Yield the built-in documents of `split` ("all", "train" or "heldout") in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for index in range(N_STORIES):
        if split == "all" or is_builtin_heldout(index) == (split == "heldout"):
            yield story(index)


@dataclass(frozen=True)
class DataSource:
    kind: str  # "builtin" | "files" | "hub"
    spec: str  # canonical form: "builtin", a resolved path or pattern, or "name[:config]"
    files: tuple[Path, ...] = ()
    # mlx_lm's layout (a folder with train.jsonl): valid.jsonl is the held-out split, by file
    heldout_files: tuple[Path, ...] = ()
    name: str = ""
    config: str | None = None


def parse_source(spec: str | Path) -> DataSource:
    """Resolve a `--data` string; missing local paths raise FileNotFoundError naming them."""
    text = str(spec)
    if text == BUILTIN:
        return DataSource("builtin", BUILTIN)
    path = Path(text).expanduser()
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = tuple(p for p in matches if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(FILE_SUFFIXES)} files match {text!r}")
        return DataSource("files", str(path.absolute()), files)
    if path.is_dir() and (path / "train.jsonl").is_file():
        valid = (path / "valid.jsonl",) if (path / "valid.jsonl").is_file() else ()
        return DataSource("files", str(path.resolve()), (path / "train.jsonl",), valid)
    if path.is_dir():
        files = tuple(
            sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        )
        if not files:
            raise ValueError(f"empty corpus: no {'/'.join(FILE_SUFFIXES)} files in folder {path}")
        return DataSource("files", str(path.resolve()), files)
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type; expected {', '.join(FILE_SUFFIXES)}")
        return DataSource("files", str(path.resolve()), (path,))
    if looks_like_path(text) or path.suffix in FILE_SUFFIXES:
        raise FileNotFoundError(f"data path not found: {text}")
    name, _, config = text.partition(":")
    return DataSource("hub", text, name=name, config=config or None)


def is_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable (cross-run, cross-machine) assignment of a document to the held-out split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _HASH_BUCKETS < round(fraction * _HASH_BUCKETS)


# --- readers: each yields (index, text) for documents with index >= start ---------------------


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {offset + e.start} "
            f"(byte 0x{raw[e.start]:02x}); convert the file to UTF-8"
        ) from None


def _has_separator_lines(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _SEPARATOR_LINE.search(data) is not None


def _read_txt(path: Path, start: int) -> Iterator[tuple[int, str]]:
    by_separator = _has_separator_lines(path)
    index, offset, lines = 0, 0, []
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(raw, path, offset)
            if offset == 0:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            if by_separator:
                is_break = line.rstrip("\r\n") == DOC_SEPARATOR
            else:
                is_break = not line.strip()
            if not is_break:
                lines.append(line)
                continue
            text = "".join(lines).strip()
            lines = []
            if text:
                if index >= start:
                    yield index, text
                index += 1
        text = "".join(lines).strip()
        if text and index >= start:
            yield index, text


def _missing_column(path: object, column: str, columns: list[str]) -> ValueError:
    return ValueError(
        f"{path} has no text column {column!r} (its columns: {columns}); "
        f"choose the column with --text-column NAME"
    )


def _row_text(row: Any, column: str, where: object) -> str | None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    if column not in row:
        raise _missing_column(where, column, list(row))
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: column {column!r} holds {type(text).__name__}, not text")
    return text if text and text.strip() else None


def _read_jsonl(path: Path, column: str, start: int) -> Iterator[tuple[int, str]]:
    index, offset = 0, 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            row_index, index = index, index + 1
            if row_index < start:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            text = _row_text(row, column, path)
            if text is not None:
                yield row_index, text


def _read_parquet(path: Path, column: str, start: int) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read parquet ({e})") from e
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise _missing_column(path, column, schema.names)
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {column!r} has type {kind}, not text")
    row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row + rows <= start:  # skip whole row groups when resuming
            row += rows
            continue
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[column]):
            for text in batch.column(0).to_pylist():
                if row >= start and text and text.strip():
                    yield row, text
                row += 1


def require_hub(source: DataSource) -> None:
    reason = hub_unreachable_reason()
    if reason:
        raise ConnectionError(
            f"cannot stream hub dataset {source.spec!r}: {reason}. Offline? {_DATA_HINT}"
        )


def _read_hub(source: DataSource, column: str, start: int) -> Iterator[tuple[int, str]]:
    require_hub(source)
    import datasets

    try:
        rows = datasets.load_dataset(source.name, source.config, split="train", streaming=True)
    except Exception as e:  # the hub client raises many types; all mean "cannot use this"
        raise ValueError(f"cannot open hub dataset {source.spec!r} ({e}). {_DATA_HINT}") from e
    if start:
        rows = rows.skip(start)
    for index, row in enumerate(rows, start):
        text = _row_text(row, column, f"hub dataset {source.spec!r}")
        if text is not None:
            yield index, text


def positioned_documents(
    source: DataSource, column: str, split: str, fraction: float, file: int = 0, doc: int = 0
) -> Iterator[tuple[int, int, str]]:
    """Yield (file index, document index, text) of `split`, from position (file, doc) on."""
    if source.kind == "builtin":
        for index, text in enumerate(builtin_documents(split)):
            if index >= doc:
                yield 0, index, text
        return
    if source.kind == "hub":
        readers = [(0, _read_hub(source, column, doc))]
    else:
        readers = (
            (i, _read_file(path, column, doc if i == file else 0))
            for i, path in enumerate(source.files)
            if i >= file
        )
    for i, reader in readers:
        for index, text in reader:
            if split == "all" or is_heldout(text, fraction) == (split == "heldout"):
                yield i, index, text


def _read_file(path: Path, column: str, start: int) -> Iterator[tuple[int, str]]:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".txt":
        return _read_txt(path, start)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, column, start)
    return _read_parquet(path, column, start)


def iter_documents(
    source: str | Path | DataSource,
    *,
    text_column: str = "text",
    split: str = "all",
    heldout_fraction: float = HELDOUT_FRACTION,
) -> Iterator[str]:
    """Yield the document texts of a `--data` source (one pass, deterministic order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(source, DataSource):
        source = parse_source(source)
    for _, _, text in positioned_documents(source, text_column, split, heldout_fraction):
        yield text
