import itertools
import json
import time

import numpy as np
import pytest
from conftest import HELDOUT_TXT, TOKENIZER_DIR, TRAIN_DOCS, TRAIN_TXT

from customllm.corpus import (
    BUILTIN,
    builtin_documents,
    is_heldout,
    iter_documents,
    parse_source,
)
from customllm.data import DEFAULT_HUB_DATA, StreamDataset, eval_batches
from customllm.stories import story
from customllm.tokenizer import load_tokenizer

DOCS = [
    "Once upon a time there was a cat.",
    "The dog barked.\n\nThen it slept all day long, dreaming of bones.",
    "A short one.",
    "Numbers 12345 and ünïcødé text.",
    "The end of the little corpus is here, with a longer sentence to pad it out.",
]
OFFLINE_AND_PROXY_VARS = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HTTPS_PROXY",
    "https_proxy",
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture
def tiny_txt(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in DOCS), encoding="utf-8")
    return path


def expected_stream(tok, docs):
    ids = []
    for doc in docs:
        ids += tok.encode(doc, add_special_tokens=False) + [0]
    return np.array(ids, dtype=np.int32)


def take(ds, n):
    return [next(it) for it in [iter(ds)] for _ in range(n)]


# --- documents and sources ----------------------------------------------------------------------


def test_txt_splits_on_separator_lines_else_paragraphs(tmp_path, tiny_txt):
    assert list(iter_documents(tiny_txt)) == DOCS
    plain = tmp_path / "plain.txt"
    plain.write_text("First para\nline two.\n\n\nSecond para.\r\n\r\nThird.", encoding="utf-8")
    assert list(iter_documents(plain)) == ["First para\nline two.", "Second para.", "Third."]


def test_folder_and_glob_sources(tmp_path, tiny_txt):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    source = parse_source(str(tmp_path))
    assert [p.name for p in source.files] == ["b.jsonl", "tiny.txt"]
    assert list(iter_documents(tmp_path)) == ["from jsonl", *DOCS]
    assert [p.name for p in parse_source(str(tmp_path / "*.txt")).files] == ["tiny.txt"]
    hub = parse_source(DEFAULT_HUB_DATA)
    assert (hub.kind, hub.config) == ("hub", "cosmopedia-v2")
    assert hub.name == "HuggingFaceTB/smollm-corpus"


# --- packing ------------------------------------------------------------------------------------


def test_packing_reproduces_documents_joined_by_eos(tok, tiny_txt):
    ds = StreamDataset(tiny_txt, tok, seq_len=7, split="all", loop=False)
    blocks = list(ds)
    expected = expected_stream(tok, DOCS)
    assert all(b.shape == (8,) and b.dtype == np.int32 for b in blocks)
    assert len(blocks) == len(expected) // 8
    np.testing.assert_array_equal(np.concatenate(blocks), expected[: len(blocks) * 8])


def test_looping_stream_carries_leftover_across_epochs(tok, tiny_txt):
    ds = StreamDataset(tiny_txt, tok, seq_len=7, split="all")
    one_epoch = expected_stream(tok, DOCS)
    n_blocks = 3 * len(one_epoch) // 8
    stream = np.concatenate(take(ds, n_blocks))
    np.testing.assert_array_equal(stream, np.tile(one_epoch, 3)[: n_blocks * 8])
    assert ds.epoch == n_blocks * 8 // len(one_epoch)


def test_next_batch_shape(tok):
    ds = StreamDataset(TRAIN_TXT, tok, seq_len=64)
    batch = ds.next_batch(4)
    assert batch.shape == (4, 65) and batch.dtype == np.int32


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_resume_matches_uninterrupted_stream_across_epochs(tok, tiny_txt, shuffle_buffer):
    kwargs = dict(split="all", shuffle_buffer=shuffle_buffer, seed=3)
    reference = take(StreamDataset(tiny_txt, tok, 7, **kwargs), 40)  # ~4 epochs of ~10 blocks
    epochs = set()
    for cut in [0, 1, 6, 9, 10, 11, 13, 25, 39]:
        first = StreamDataset(tiny_txt, tok, 7, **kwargs)
        take(first, cut)
        epochs.add(first.epoch)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = StreamDataset(tiny_txt, tok, 7, **kwargs)
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(take(resumed, 40 - cut), reference[cut:])
    assert max(epochs) >= 2  # some cuts fall after an epoch boundary


def test_resume_refuses_a_data_folder_whose_files_changed(tok, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(DOCS), encoding="utf-8")
    first = StreamDataset(folder, tok, 7)
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["files"] == [["a.txt", (folder / "a.txt").stat().st_size]]
    StreamDataset(folder, tok, 7).load_state_dict(state)  # unchanged: resumes

    (folder / "0.txt").write_text("A new first file.", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"files changed since the checkpoint: added 0\.txt.*--init"
    ):
        StreamDataset(folder, tok, 7).load_state_dict(state)
    (folder / "0.txt").unlink()
    with (folder / "a.txt").open("a", encoding="utf-8") as f:
        f.write("\n\nOne more story.")
    with pytest.raises(ValueError, match=r"a\.txt was \d+ bytes, now \d+"):
        StreamDataset(folder, tok, 7).load_state_dict(state)
    del state["files"]  # a state saved before file lists were kept still resumes
    StreamDataset(folder, tok, 7).load_state_dict(state)


def test_an_mlx_lm_data_folder_trains_on_train_jsonl_and_holds_out_valid_jsonl(tok, tmp_path):
    for name, docs in [("train", DOCS[:3]), ("valid", DOCS[3:]), ("test", ["Never read."])]:
        rows = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        (tmp_path / f"{name}.jsonl").write_text(rows, encoding="utf-8")
    train = StreamDataset(tmp_path, tok, 7, loop=False)
    blocks = np.concatenate(list(train))
    np.testing.assert_array_equal(blocks, expected_stream(tok, DOCS[:3])[: len(blocks)])
    assert len(blocks) > len(expected_stream(tok, DOCS[:3])) - 8  # every document, none held out
    heldout = np.concatenate(eval_batches(None, tmp_path, tok, 7, 2)).reshape(-1)
    np.testing.assert_array_equal(heldout, expected_stream(tok, DOCS[3:])[: len(heldout)])


def test_resume_on_real_corpus_with_shuffle_and_ranks(tok):
    kwargs = dict(shuffle_buffer=16, seed=7, rank=1, world_size=2)
    reference = take(StreamDataset(TRAIN_TXT, tok, 128, **kwargs), 60)
    first = StreamDataset(TRAIN_TXT, tok, 128, **kwargs)
    take(first, 35)
    resumed = StreamDataset(TRAIN_TXT, tok, 128, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    np.testing.assert_array_equal(take(resumed, 25), reference[35:])


def test_shuffle_buffer_permutes_the_blocks(tok):
    """One pass with a shuffle buffer yields the blocks of the unshuffled pass, each once, in
    another order, and another seed in another order again."""

    def one_pass(**kwargs):
        ds = StreamDataset(HELDOUT_TXT, tok, 64, split="all", loop=False, **kwargs)
        return [tuple(block.tolist()) for block in ds]

    plain = one_pass()
    shuffled, reseeded = one_pass(shuffle_buffer=16, seed=7), one_pass(shuffle_buffer=16, seed=8)
    assert len(plain) > 32
    assert sorted(shuffled) == sorted(plain) == sorted(reseeded)
    assert shuffled != plain and reseeded != shuffled


def test_state_from_another_stream_is_rejected(tok, tiny_txt, tmp_path):
    state = StreamDataset(tiny_txt, tok, 7).state_dict()
    with pytest.raises(ValueError, match="seq_len: saved 7, now 8"):
        StreamDataset(tiny_txt, tok, 8).load_state_dict(state)
    other = tmp_path / "other.txt"
    other.write_text("other text", encoding="utf-8")
    with pytest.raises(ValueError, match="source"):
        StreamDataset(other, tok, 7).load_state_dict(state)


def test_rank_shards_are_disjoint_and_cover_the_stream(tok, tiny_txt):
    full = list(StreamDataset(tiny_txt, tok, 3, split="all", loop=False))
    shards = [
        list(StreamDataset(tiny_txt, tok, 3, split="all", loop=False, rank=r, world_size=3))
        for r in range(3)
    ]
    for rank, shard in enumerate(shards):
        np.testing.assert_array_equal(np.array(shard), np.array(full[rank::3]))
    assert sum(len(s) for s in shards) == len(full)


# --- held-out split -----------------------------------------------------------------------------


def test_train_and_heldout_splits_are_disjoint(tok):
    train_docs = list(iter_documents(TRAIN_TXT, split="train"))
    heldout_docs = list(iter_documents(TRAIN_TXT, split="heldout"))
    assert len(train_docs) + len(heldout_docs) == TRAIN_DOCS
    assert 20 < len(heldout_docs) < 80
    assert not set(heldout_docs) & set(train_docs)
    assert all(is_heldout(d) for d in heldout_docs)

    train_blocks = list(StreamDataset(TRAIN_TXT, tok, 512, split="train", loop=False))
    train_text = tok.decode(np.concatenate(train_blocks).tolist())
    assert train_docs[5] in train_text
    assert not any(doc in train_text for doc in heldout_docs)

    batches = eval_batches(None, TRAIN_TXT, tok, seq_len=64, batch_size=4)
    eval_ids = np.concatenate([b.reshape(-1) for b in batches])
    np.testing.assert_array_equal(eval_ids, expected_stream(tok, heldout_docs)[: len(eval_ids)])
    assert len(eval_ids) > len(expected_stream(tok, heldout_docs)) - 4 * 65


def test_eval_source_is_read_whole_and_capped(tok):
    batches = eval_batches(HELDOUT_TXT, TRAIN_TXT, tok, seq_len=128, batch_size=8, max_batches=3)
    assert [b.shape for b in batches] == [(8, 129)] * 3
    docs = list(iter_documents(HELDOUT_TXT))  # in file order: the first 129 tokens
    np.testing.assert_array_equal(batches[0][0], expected_stream(tok, docs)[:129])


def test_eval_command_reads_the_builtin_heldout_stories(tok):
    """`eval --data builtin` scores the 2,000 held-out stories, not the ones trained on."""
    from types import SimpleNamespace

    from customllm.evaluate import heldout_batches

    options = dict(data=BUILTIN, seq_len=64, batch_size=2, max_batches=2, text_column="text")
    config = SimpleNamespace(max_position_embeddings=128)
    batches = heldout_batches("m", tok, config, options)
    stream = expected_stream(tok, [story(0), story(10), story(20), story(30)])
    np.testing.assert_array_equal(np.concatenate([b.reshape(-1) for b in batches]), stream[:260])


# --- columns and errors -------------------------------------------------------------------------


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)


def test_jsonl_and_parquet_text_column(tok, tmp_path):
    rows = [{"id": i, "content": f"document number {i}"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    write_parquet(parquet, {"id": [r["id"] for r in rows], "content": [r["content"] for r in rows]})
    for path in (jsonl, parquet):
        with pytest.raises(
            ValueError, match=r"no text column 'text'.*'content'.*--text-column"
        ) as e:
            list(iter_documents(path))
        assert path.name in str(e.value)
        assert list(iter_documents(path, text_column="content")) == [r["content"] for r in rows]
        ds = StreamDataset(path, tok, 3, text_column="content", split="all", loop=False)
        first = ds.next_batch(1)
        resumed = StreamDataset(path, tok, 3, text_column="content", split="all", loop=False)
        resumed.load_state_dict(ds.state_dict())  # skips parquet row groups / jsonl rows
        whole = StreamDataset(path, tok, 3, text_column="content", split="all", loop=False)
        np.testing.assert_array_equal(
            np.concatenate([first, resumed.next_batch(100)]), whole.next_batch(100)
        )


def test_undecodable_bytes_name_file_and_offset(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nw\xffrld\n")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 at byte offset 11"):
        StreamDataset(bad, tok, 4).next_batch(1)


@pytest.mark.parametrize("spec", ["./no_such_dir/data.txt", "missing.jsonl", "/no/such/*.txt"])
def test_missing_path(spec):
    with pytest.raises(FileNotFoundError, match="no_such_dir|missing.jsonl|/no/such"):
        parse_source(spec)


def test_empty_corpus(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n<|endoftext|>\n  \n<|endoftext|>\n", encoding="utf-8")
    for path in (empty, blank):  # no documents at all: no hint about the held-out split
        with pytest.raises(ValueError, match="empty corpus: no documents .*blank") as info:
            StreamDataset(path, tok, 8).next_batch(1)
        assert "held-out" not in str(info.value)
    one = tmp_path / "one.txt"
    one.write_text("a single document", encoding="utf-8")  # it goes to one split only
    splits = [StreamDataset(one, tok, 4, split=s) for s in ("train", "heldout")]
    errors = []
    for dataset in splits:
        try:
            dataset.next_batch(1)
        except ValueError as err:
            errors.append(str(err))
    assert len(errors) == 1 and "held-out fraction" in errors[0], errors
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        parse_source(str(tmp_path / "sub"))
    small = tmp_path / "small.txt"
    small.write_text("hi", encoding="utf-8")
    with pytest.raises(ValueError, match="corpus too small"):
        StreamDataset(small, tok, 8, split="all", loop=False).next_batch(1)


def test_hub_unreachable_fails_fast_with_hint(tok, monkeypatch):
    for var in OFFLINE_AND_PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConnectionError, match="--data PATH"):
        StreamDataset(DEFAULT_HUB_DATA, tok, 128)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE.*--data PATH"):
        list(iter_documents(DEFAULT_HUB_DATA))
    assert time.monotonic() - start < 10


def test_hub_stream_reads_rows_and_resumes(tok, monkeypatch):
    """The hub path end to end, with `datasets.load_dataset` serving a local streaming
    IterableDataset (no network here): the dataset, config and split asked for, the text
    column read, empty rows skipped, and a resumed stream (which skips rows) equal to an
    uninterrupted one."""
    import datasets

    import customllm.corpus as corpus

    docs = list(iter_documents(TRAIN_TXT))[:400]  # a few held out by the hash split
    rows = [{"text": "", "seed": -1}] + [{"text": d, "seed": i} for i, d in enumerate(docs)]
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(corpus, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(iter_documents(DEFAULT_HUB_DATA)) == docs
    assert calls == [("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", True)]
    train = list(iter_documents(DEFAULT_HUB_DATA, split="train"))
    heldout = list(iter_documents(DEFAULT_HUB_DATA, split="heldout"))
    assert heldout and sorted(train + heldout) == sorted(docs)

    kwargs = dict(shuffle_buffer=4, seed=1)
    reference = take(StreamDataset(DEFAULT_HUB_DATA, tok, 64, **kwargs), 50)
    first = StreamDataset(DEFAULT_HUB_DATA, tok, 64, **kwargs)
    take(first, 23)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["doc"] > 0  # the resumed reader starts past the first rows
    resumed = StreamDataset(DEFAULT_HUB_DATA, tok, 64, **kwargs)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(take(resumed, 27), reference[23:])


# --- built-in corpus ----------------------------------------------------------------------------


def test_builtin_corpus_is_the_same_stories_everywhere_with_disjoint_heldout(tok):
    train, heldout = list(builtin_documents("train")), list(builtin_documents("heldout"))
    assert (len(train), len(heldout)) == (18_000, 2_000)
    assert heldout[:2] == [story(0), story(10)] and train[0] == story(1)
    assert not set(train) & set(heldout)
    # seeded by its number alone: the same text on every machine and Python 3 version
    assert story(1).startswith("Once upon a time, there was a curious girl named Rose.")
    assert len(set(train)) == len(train) and all(s.endswith((".", '"')) for s in train)
    assert list(iter_documents(BUILTIN, split="heldout")) == heldout
    blocks = itertools.islice(StreamDataset(BUILTIN, tok, 256, split="train", loop=False), 50)
    assert len(list(blocks)) == 50
    batches = eval_batches(None, BUILTIN, tok, seq_len=256, batch_size=4, max_batches=3)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
