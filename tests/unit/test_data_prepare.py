import gzip
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import apogee.data.prepare as prep
from apogee.data.prepare import PreparedCorpus, prepare_corpus
from apogee.data.sources import fingerprint, iter_documents, list_files
from apogee.data.tokenizers import HFTokenizer


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def text_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    _write(root / "b.txt", "second doc")
    _write(root / "a.txt", "first doc é")
    _write(root / "sub" / "c.txt", "third doc")
    _write(root / "skip.md", "not matched by the glob")
    return root


# ------------------------------------------------------------------------------------- sources
def test_text_file_and_folder(tmp_path, text_dir):
    assert list(iter_documents("text", text_dir / "a.txt")) == ["first doc é"]
    docs = list(iter_documents("text", text_dir))
    assert docs == ["first doc é", "second doc", "third doc"]  # sorted by relative path
    assert list(iter_documents("text", text_dir, glob="*.md")) == ["not matched by the glob"]
    with pytest.raises(ValueError, match="data.glob"):
        list(iter_documents("text", text_dir, glob="*.csv"))


def test_text_binary_skipped_and_legacy_encoding_replaced(tmp_path):
    _write(tmp_path / "a.txt", b"\x00\x01\xff\xfe binary")
    _write(tmp_path / "b.txt", "caf\xe9".encode("latin-1"))
    assert list(iter_documents("text", tmp_path)) == ["caf\ufffd"]


def test_missing_path_names_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path") as e:
        list(iter_documents("text", tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(ValueError, match="data.path"):
        list(iter_documents("jsonl", None))
    with pytest.raises(ValueError, match="data.source"):
        list(iter_documents("csv", tmp_path))


def test_max_bytes_cuts_exactly(text_dir):
    docs = list(iter_documents("text", text_dir, max_bytes=15))
    assert docs == ["first doc é", "sec"]  # "é" is 2 bytes: 12 + 3
    assert sum(len(d.encode()) for d in docs) == 15
    # a cut inside a multi-byte character drops that character
    assert list(iter_documents("text", text_dir / "a.txt", max_bytes=11)) == ["first doc "]


def test_jsonl_folder_gz_and_errors(tmp_path):
    _write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": null}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three ✓"}) + "\n")
    assert list(iter_documents("jsonl", tmp_path)) == ["one", "two", "three ✓"]
    assert list(iter_documents("jsonl", tmp_path / "a.jsonl")) == ["one", "two"]

    bad = _write(tmp_path / "bad" / "x.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed JSON") as e:
        list(iter_documents("jsonl", bad))
    assert "\n" not in str(e.value)
    other = _write(tmp_path / "other" / "y.jsonl", '{"body": "ok"}\n')
    with pytest.raises(ValueError, match=r"y\.jsonl:1: .*data\.text_key"):
        list(iter_documents("jsonl", other))
    assert list(iter_documents("jsonl", other, text_key="body")) == ["ok"]


def test_parquet_row_groups_and_missing_column(tmp_path):
    texts = [f"row {i}" for i in range(7)] + [None]
    table = pa.table({"text": texts, "n": list(range(8))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"text": ["last"]}), tmp_path / "b.parquet")
    assert list(iter_documents("parquet", tmp_path)) == [f"row {i}" for i in range(7)] + ["last"]
    with pytest.raises(ValueError, match="data.text_key"):
        list(iter_documents("parquet", tmp_path / "a.parquet", text_key="content"))


def test_stdlib_source_python_and_deterministic():
    a = list(iter_documents("stdlib", None, max_bytes=200_000))
    b = list(iter_documents("stdlib", None, max_bytes=200_000))
    assert a == b and len(a) > 1
    assert sum(len(d.encode()) for d in a) == 200_000
    assert any("import " in d or "def " in d for d in a)
    files = list_files("stdlib", None)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_fingerprint_tracks_file_changes(text_dir):
    fp = fingerprint("text", text_dir)
    assert fingerprint("text", text_dir) == fp
    st = (text_dir / "a.txt").stat()
    os.utime(text_dir / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint("text", text_dir) != fp
    assert fingerprint("text", text_dir, glob="*.md") != fingerprint("text", text_dir)


# ------------------------------------------------------------------------------------- prepare
def test_prepare_byte_corpus_and_meta(tmp_path, text_dir):
    c = prepare_corpus(source="text", path=str(text_dir), tokenizer="byte",
                       cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(c, PreparedCorpus) and isinstance(c.tokens, np.memmap)
    assert c.tokens.ndim == 1 and c.tokens.dtype == np.uint16 and not c.tokens.flags.writeable
    assert c.tokenizer.decode(c.tokens) == "first doc é\n\nsecond doc\n\nthird doc"
    assert c.vocab_size == 256 and c.num_tokens == len(c.tokens)
    meta = json.loads((c.cache_path / "meta.json").read_text())
    assert meta["num_tokens"] == c.num_tokens and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 256 and meta["tokenizer"] == "byte" and meta["source"] == "text"
    assert meta["path"] == str(text_dir.resolve()) and meta["created"]
    assert (c.cache_path / "tokenizer" / "apogee_tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_second_call_hits_cache(tmp_path, text_dir, monkeypatch):
    kw = dict(source="text", path=str(text_dir), tokenizer="char", cache_dir=tmp_path,
              progress=False)
    first = prepare_corpus(**kw)
    tokens_bin = first.cache_path / "tokens.bin"
    mtime = tokens_bin.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(prep, "build_tokenizer", boom)
    monkeypatch.setattr(prep, "iter_documents", boom)
    second = prepare_corpus(**kw)
    assert second.cache_path == first.cache_path
    assert np.array_equal(second.tokens, first.tokens)
    assert second.tokenizer.chars == first.tokenizer.chars
    assert tokens_bin.stat().st_mtime_ns == mtime


def test_cache_key_changes_with_what_changes_ids(tmp_path, text_dir):
    def path_of(**kw):
        args = dict(source="text", path=str(text_dir), tokenizer="byte", cache_dir=tmp_path,
                    progress=False)
        return prepare_corpus(**{**args, **kw}).cache_path

    byte = path_of()
    assert path_of(tokenizer="char") != byte
    assert path_of(max_bytes=5) != byte
    # settings that cannot change byte ids reuse the cache
    assert path_of(bpe_vocab_size=300) == byte and path_of(text_key="body") == byte
    bpe300 = path_of(tokenizer="bpe", bpe_vocab_size=300)
    assert bpe300 != path_of(tokenizer="bpe", bpe_vocab_size=320)
    _write(text_dir / "d.txt", "a new document")
    assert path_of() != byte


def test_bpe_corpus_has_eot_between_documents(tmp_path, text_dir):
    c = prepare_corpus(source="text", path=str(text_dir), tokenizer="bpe", bpe_vocab_size=300,
                       cache_dir=tmp_path, progress=False)
    eot = c.tokenizer.eot_id
    assert isinstance(c.tokenizer, HFTokenizer) and eot is not None
    assert int((np.asarray(c.tokens) == eot).sum()) == 2
    parts = np.split(np.asarray(c.tokens), np.flatnonzero(np.asarray(c.tokens) == eot))
    texts = [c.tokenizer.decode([t for t in p if t != eot]) for p in parts]
    assert texts == ["first doc é", "second doc", "third doc"]


def test_long_documents_cut_give_same_ids(tmp_path, monkeypatch):
    lines = [f"Line {i} says{' more' * (i % 7)} words, then stops." for i in range(3000)]
    text = "\n".join(lines) + "\n  indented tail\n"
    _write(tmp_path / "one.txt", text)
    monkeypatch.setattr(prep, "_PIECE_CHARS", 5000)
    monkeypatch.setattr(prep, "_BATCH_CHARS", 20000)
    assert len(prep._split_document(text, 5000)) > 10
    assert "".join(prep._split_document(text, 5000)) == text
    c = prepare_corpus(source="text", path=str(tmp_path / "one.txt"), tokenizer="bpe",
                       bpe_vocab_size=500, cache_dir=tmp_path / "cache", progress=False)
    assert c.tokens.tolist() == c.tokenizer.encode(text)


def test_failure_leaves_no_cache(tmp_path, text_dir, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep._Progress, "tick", fail)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_corpus(source="text", path=str(text_dir), tokenizer="byte", cache_dir=cache,
                       progress=False)
    assert list(cache.iterdir()) == []  # no final folder and no temporary one


def test_racing_writers_both_get_the_cache(tmp_path, text_dir, monkeypatch):
    # Both builders finish before either publishes: one rename wins, the other must reuse it.
    barrier = threading.Barrier(2, timeout=30)
    real = prep._publish

    def publish(tmp, final):
        barrier.wait()
        real(tmp, final)

    monkeypatch.setattr(prep, "_publish", publish)
    results, errors = [], []

    def run():
        try:
            results.append(prepare_corpus(source="text", path=str(text_dir), tokenizer="byte",
                                          cache_dir=tmp_path / "cache", progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results[0].cache_path == results[1].cache_path
    assert np.array_equal(results[0].tokens, results[1].tokens)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].cache_path.name]


def test_progress_output(tmp_path, text_dir, capsys):
    prepare_corpus(source="text", path=str(text_dir), tokenizer="byte", cache_dir=tmp_path,
                   progress=False)
    assert capsys.readouterr().err == ""
    prepare_corpus(source="text", path=str(text_dir), tokenizer="char", cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert "3 docs" in err and "tok/s" in err and "done" in err


def test_stdlib_prepare(tmp_path):
    c = prepare_corpus(source="stdlib", path=None, tokenizer="byte", max_bytes=100_000,
                       cache_dir=tmp_path, progress=False)
    n_docs = json.loads((c.cache_path / "meta.json").read_text())["num_documents"]
    assert c.num_tokens == 100_000 + 2 * (n_docs - 1)
    assert "import" in c.tokenizer.decode(c.tokens[:20_000])


def test_empty_corpus_names_path(tmp_path):
    _write(tmp_path / "c" / "empty.txt", "")
    with pytest.raises(ValueError, match="data.path"):
        prepare_corpus(source="text", path=str(tmp_path / "c"), tokenizer="byte",
                       cache_dir=tmp_path / "cache", progress=False)


def test_bad_settings_named(tmp_path, text_dir):
    base = dict(path=str(text_dir), cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="data.source"):
        prepare_corpus(source="csv", tokenizer="byte", **base)
    with pytest.raises(ValueError, match="data.tokenizer"):
        prepare_corpus(source="text", tokenizer="gpt9", **base)
    with pytest.raises(ValueError, match="data.bin_dtype"):
        prepare_corpus(source="bin", tokenizer="byte", bin_dtype="int8", **base)


# ------------------------------------------------------------------------------------ bin source
def test_bin_single_file_is_mapped_in_place(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 256
    ids.tofile(tmp_path / "train.bin")
    c = prepare_corpus(source="bin", path=str(tmp_path / "train.bin"), tokenizer="byte",
                       cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(c.tokens, ids) and c.vocab_size == 256
    assert Path(c.tokens.filename) == (tmp_path / "train.bin").resolve()
    assert not (c.cache_path / "tokens.bin").exists()
    assert not c.tokens.flags.writeable


def test_bin_folder_concatenated_uint32_with_tokenizer_json(tmp_path):
    bpe = HFTokenizer.train_bpe(["some text to learn from " * 50], vocab_size=300)
    bpe.tok.save(str(tmp_path / "tokenizer.json"))
    shards = tmp_path / "shards"
    shards.mkdir()
    a = np.array([1, 2, 3], dtype=np.uint32)
    b = np.array([bpe.vocab_size - 1, 0], dtype=np.uint32)
    b.tofile(shards / "01.bin")
    a.tofile(shards / "00.bin")
    c = prepare_corpus(source="bin", path=str(shards), tokenizer=str(tmp_path / "tokenizer.json"),
                       bin_dtype="uint32", cache_dir=tmp_path / "cache", progress=False)
    assert c.tokens.tolist() == [1, 2, 3, bpe.vocab_size - 1, 0]
    assert c.tokens.dtype == np.uint32 and c.vocab_size == bpe.vocab_size
    assert (c.cache_path / "tokens.bin").is_file()
    assert c.tokenizer.encode("some text") == bpe.encode("some text")


def test_bin_errors_name_settings(tmp_path):
    (np.arange(300, dtype=np.uint16)).tofile(tmp_path / "big_ids.bin")
    base = dict(source="bin", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="data.tokenizer") as e:
        prepare_corpus(path=str(tmp_path / "big_ids.bin"), tokenizer="byte", **base)
    assert "299" in str(e.value)
    with pytest.raises(ValueError, match="data.tokenizer"):
        prepare_corpus(path=str(tmp_path / "big_ids.bin"), tokenizer="char", **base)
    _write(tmp_path / "odd" / "x.bin", b"\x01\x02\x03")
    with pytest.raises(ValueError, match="data.bin_dtype"):
        prepare_corpus(path=str(tmp_path / "odd"), tokenizer="byte", **base)
    with pytest.raises(FileNotFoundError, match="data.path"):
        prepare_corpus(path=str(tmp_path / "nope.bin"), tokenizer="byte", **base)
    with pytest.raises(ValueError, match="documents"):
        list(iter_documents("bin", tmp_path / "big_ids.bin"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
