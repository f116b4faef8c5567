from pathlib import Path

import numpy as np
import pytest

from apogee.data.tokenizers import (
    EOT_TOKEN,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
)

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
SAMPLE = "Hello, wörld! naïve café — 日本語 ✓ 🚀\nsecond line\n"
CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 40,
    "def train(model, data):\n    return model(data)\n" * 40,
    "To be, or not to be, that is the question:\n" * 40,
]


def _no_texts():
    raise AssertionError("texts() must not be called for this tokenizer")


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe(CORPUS, vocab_size=400)


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert max(ids) > 127 and tok.vocab_size == 256 and tok.eot_id is None
    assert tok.decode(ids) == SAMPLE
    assert tok.separator_ids() == [10, 10]
    [arr] = tok.encode_batch([SAMPLE])
    assert arr.tolist() == ids


def test_byte_decode_invalid_utf8_and_bad_id():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert tok.decode(np.array([104, 105], dtype=np.uint16)) == "hi"
    with pytest.raises(ValueError, match="256"):
        tok.decode([256])


def test_char_fit_round_trip_and_unknown_char():
    tok = CharTokenizer.fit(["hello world", "abc"])
    assert tok.chars == sorted(set("hello worldabc\n"))
    assert tok.vocab_size == len(tok.chars)
    text = "hello abc\nworld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids
    assert tok.separator_ids() == tok.encode("\n\n")
    with pytest.raises(ValueError, match="'Z'") as e:
        tok.encode("helloZ")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'日'"):  # code point beyond the lookup table
        tok.encode("日")


def test_char_non_ascii_vocab():
    tok = CharTokenizer.fit([SAMPLE])
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_bpe_round_trip(bpe):
    # a tiny corpus runs out of pairs to merge before reaching the asked size
    assert 257 < bpe.vocab_size <= 400
    assert bpe.eot_id == bpe.tok.token_to_id(EOT_TOKEN)
    for text in CORPUS + [SAMPLE, ""]:
        assert bpe.decode(bpe.encode(text)) == text
    text = CORPUS[0]
    assert len(bpe.encode(text)) < len(text.encode()) / 2  # merges were learnt
    assert [a.tolist() for a in bpe.encode_batch(CORPUS)] == [bpe.encode(t) for t in CORPUS]
    assert bpe.separator_ids() == [bpe.eot_id]


def test_bpe_vocab_too_small():
    with pytest.raises(ValueError, match="data.bpe_vocab_size"):
        HFTokenizer.train_bpe(CORPUS, vocab_size=100)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared tinyshakespeare.txt not present")
def test_bpe_on_shakespeare():
    text = SHAKESPEARE.read_text()[:200_000]
    tok = build_tokenizer("bpe", lambda: [text], bpe_vocab_size=1024)
    ids = tok.encode(text[:5000])
    assert tok.decode(ids) == text[:5000]
    assert len(ids) < 5000 / 2.5


def test_save_and_load_every_kind(tmp_path, bpe):
    for tok in (ByteTokenizer(), CharTokenizer.fit([SAMPLE]), bpe):
        d = tmp_path / tok.kind
        tok.save(d)
        back = load_tokenizer(d)
        assert type(back) is type(tok)
        assert (back.name, back.vocab_size, back.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
        assert back.encode(SAMPLE) == tok.encode(SAMPLE)
        assert back.split_safe == tok.split_safe


def test_tokenizer_json_from_file_and_folder(tmp_path, bpe):
    path = tmp_path / "mine" / "tokenizer.json"
    path.parent.mkdir()
    bpe.tok.save(str(path))
    for spec in (str(path), str(path.parent)):
        tok = build_tokenizer(spec, _no_texts, bpe_vocab_size=0)
        assert isinstance(tok, HFTokenizer) and tok.name == spec
        assert tok.eot_id == bpe.eot_id  # found "<|endoftext|>" by name
        assert tok.encode(SAMPLE) == bpe.encode(SAMPLE)
        # a file made elsewhere is never assumed safe to cut
        assert tok.split_safe is False
    assert isinstance(load_tokenizer(path.parent), HFTokenizer)


def test_build_tokenizer_specs(tmp_path):
    assert isinstance(build_tokenizer("byte", _no_texts, bpe_vocab_size=0), ByteTokenizer)
    calls = []

    def texts():
        calls.append(1)
        return iter(["abc", "cd"])

    tok = build_tokenizer("char", texts, bpe_vocab_size=0)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 5 and calls == [1]
    with pytest.raises(ValueError, match="data.tokenizer") as e:
        build_tokenizer("gpt9", _no_texts, bpe_vocab_size=0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer(str(tmp_path / "missing.json"), _no_texts, bpe_vocab_size=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer(str(bad), _no_texts, bpe_vocab_size=0)


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
