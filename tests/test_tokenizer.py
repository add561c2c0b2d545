import time

import pytest
from conftest import (
    COSMO2_DIR,
    COSMO2_VOCAB_SIZE,
    HELDOUT_DOCS,
    HELDOUT_TXT,
    TINYSTORIES_DIR,
    TOKENIZER_DIR,
    TOKENIZER_VOCAB_SIZE,
    TRAIN_TXT,
    requires_shared,
)
from tokenizers import Tokenizer

from customllm.stories import story
from customllm.tokenizer import (
    BUILTIN_VOCAB_SIZE,
    DEFAULT_TOKENIZER,
    builtin_tokenizer_dir,
    eos_token_id,
    load_tokenizer,
    train_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def test_test_tokenizer_loads_with_expected_vocab(tok):
    assert DEFAULT_TOKENIZER == "HuggingFaceTB/cosmo2-tokenizer"
    assert len(tok) == TOKENIZER_VOCAB_SIZE
    assert eos_token_id(tok) == 0
    assert tok.convert_ids_to_tokens([0, 1, 2]) == SPECIALS


def test_round_trips_heldout_text(tok):
    text = HELDOUT_TXT.read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(text) / 8 < len(ids) < len(text) / 2
    assert ids.count(0) == text.count("<|endoftext|>") == HELDOUT_DOCS
    assert tok.decode(ids) == text


def test_eos_falls_back_to_endoftext_token():
    raw = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))  # no eos_token_id attribute
    assert eos_token_id(raw) == 0


@requires_shared
def test_cosmo2_loads_and_round_trips_tinystories():
    """The real cosmo2 tokenizer in ../shared: its vocabulary and special tokens, and an exact
    round trip of the held-out TinyStories."""
    cosmo2 = load_tokenizer(COSMO2_DIR)
    assert len(cosmo2) == COSMO2_VOCAB_SIZE
    assert eos_token_id(cosmo2) == 0
    assert cosmo2.convert_ids_to_tokens([0, 1, 2]) == SPECIALS
    text = (TINYSTORIES_DIR / "heldout.txt").read_text(encoding="utf-8")
    ids = cosmo2.encode(text, add_special_tokens=False)
    assert 60_000 < len(ids) < 110_000
    assert ids.count(0) == text.count("<|endoftext|>") == 418
    assert cosmo2.decode(ids) == text
    raw = Tokenizer.from_file(str(COSMO2_DIR / "tokenizer.json"))
    assert eos_token_id(raw) == 0


@pytest.mark.parametrize("name", ["./no_such_tokenizer", "/no/such/tokenizer", "~/no_such_tok_x"])
def test_missing_local_folder_is_a_clear_error(name):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(name)
    assert time.monotonic() - start < 5


def test_missing_folder_under_existing_dir_is_local(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/tok"):
        load_tokenizer("runs/tok")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)


def test_a_damaged_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot read the tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match="local tokenizer folder"):
        load_tokenizer("customllm-tests/no-such-tokenizer")
    assert time.monotonic() - start < 10


def test_hub_id_unreachable_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(OSError, match="unreachable"):
        load_tokenizer("customllm-tests/no-such-tokenizer")
    assert time.monotonic() - start < 10


def test_train_tokenizer_saves_loadable_folder(tmp_path):
    from transformers import AutoTokenizer

    docs = TRAIN_TXT.read_text(encoding="utf-8").split("<|endoftext|>\n")
    corpus = tmp_path / "small.txt"
    corpus.write_text("<|endoftext|>\n".join(docs[:300]), encoding="utf-8")

    out = tmp_path / "tok"
    trained = train_tokenizer(corpus, vocab_size=600, out_dir=out)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(trained) == 600
    assert loaded.convert_ids_to_tokens([0, 1, 2]) == SPECIALS
    assert eos_token_id(loaded) == 0 and loaded.bos_token_id == 0

    heldout = HELDOUT_TXT.read_text(encoding="utf-8")[:5000]
    for text in (heldout, "naïve café: 1234 ünïcødé 日本語 🙂\n\n  tabs\tand  spaces "):
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    # merges were learned: far fewer tokens than bytes
    assert len(loaded.encode(heldout, add_special_tokens=False)) < len(heldout.encode()) / 2


def test_train_tokenizer_rejects_tiny_vocab(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100, out_dir=tmp_path / "tok")


def test_builtin_tokenizer_is_trained_once_into_the_cache_and_fits_the_stories(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tok = load_tokenizer("builtin")
    folder = builtin_tokenizer_dir()
    assert folder.parent == tmp_path / "customllm" and 500 < len(tok) <= BUILTIN_VOCAB_SIZE
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch left
    assert eos_token_id(tok) == 0 and tok.convert_ids_to_tokens([0, 1, 2]) == SPECIALS
    text = story(3)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.split()) * 1.5
    written = (folder / "tokenizer.json").stat().st_mtime_ns
    assert len(load_tokenizer("builtin")) == len(tok)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == written  # trained once
