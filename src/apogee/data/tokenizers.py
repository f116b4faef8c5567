"""Tokenizers: bytes, characters, and anything the `tokenizers` library can load or train.

Every tokenizer can `save` itself into a folder and `load_tokenizer` brings it back, so a prepared
corpus, a checkpoint and `apogee generate` all decode with exactly the ids the corpus was made with.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

# The file `save` writes next to the tokenizer's own files; it says which class reloads them.
META_FILE = "apogee_tokenizer.json"
HF_FILE = "tokenizer.json"
EOT_TOKEN = "<|endoftext|>"
# Special tokens that mean "end of document" in tokenizer.json files made elsewhere, most common
# first (GPT-2/NeoX, Llama 3, Llama 2/Mistral, Gemma, Llama 3 chat).
_KNOWN_EOT_TOKENS = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
# Text the byte and char tokenizers put between documents, since they have no eot id.
DOC_SEPARATOR_TEXT = "\n\n"
# A byte-level BPE trainer needs the 256 byte symbols plus the eot token before any merge.
_MIN_BPE_VOCAB = 257


class Tokenizer(ABC):
    """Text <-> token ids. `name` is the spec it was built from ("byte", "char", "bpe", a path)."""

    kind: str = ""  # what `save` records so `load_tokenizer` picks the class
    name: str
    vocab_size: int
    # Token put between documents in a prepared corpus; None means the separator is text instead.
    eot_id: int | None = None
    # True when cutting a document at a "word\nWord" line break and encoding the pieces gives the
    # same ids as encoding it whole; prepare uses it to spread one huge document over threads.
    split_safe: bool = False

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts at once; the fast path that corpus preparation uses."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def separator_ids(self) -> list[int]:
        """Ids placed between two documents of a corpus."""
        if self.eot_id is not None:
            return [self.eot_id]
        return self.encode(DOC_SEPARATOR_TEXT)

    def _write_meta(self, directory: Path, **extra: object) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, **extra}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255. No eot id: documents are separated by the bytes of "\\n\\n",
    which keeps every id a real byte so any id sequence decodes."""

    kind = "byte"

    def __init__(self, name: str = "byte") -> None:
        self.name = name
        self.vocab_size = 256
        self.eot_id = None
        self.split_safe = True

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_array(t) for t in texts]

    @staticmethod
    def _encode_array(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = int(arr[(arr < 0) | (arr > 255)][0])
            raise ValueError(f"byte tokenizer cannot decode id {bad}: ids must be 0..255")
        # A model can emit a byte sequence that is not valid UTF-8; show it rather than fail.
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        self._write_meta(Path(directory))


class CharTokenizer(Tokenizer):
    """One id per character, vocabulary = sorted unique characters of the corpus (nanoGPT's
    shakespeare_char). No eot id: documents are separated by "\\n\\n"."""

    kind = "char"

    def __init__(self, chars: Iterable[str], name: str = "char") -> None:
        self.chars: list[str] = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("char tokenizer vocabulary must hold single characters")
        if not self.chars:
            raise ValueError("data.tokenizer='char' needs a non-empty corpus to build a vocabulary")
        self.name = name
        self.vocab_size = len(self.chars)
        self.eot_id = None
        self.split_safe = True
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # Lookup table indexed by code point; -1 marks characters outside the vocabulary.
        self._lut = np.full(int(codepoints.max()) + 1, -1, dtype=np.int32)
        self._lut[codepoints] = np.arange(len(self.chars), dtype=np.int32)
        self._itos = np.array(self.chars, dtype=object)

    @classmethod
    def fit(cls, texts: Iterable[str], name: str = "char") -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        # "\n" is always in the vocabulary so the document separator can be encoded.
        seen.update(DOC_SEPARATOR_TEXT)
        return cls(seen, name=name)

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_array(t) for t in texts]

    def _encode_array(self, text: str) -> np.ndarray:
        # utf-32 gives one fixed-width code point per character, so a table lookup maps them all.
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        in_range = cps < self._lut.size
        ids = np.full(cps.shape, -1, dtype=np.int32)
        ids[in_range] = self._lut[cps[in_range]]
        if ids.size and ids.min() < 0:
            ch = chr(int(cps[np.argmax(ids < 0)]))
            raise ValueError(
                f"character {ch!r} is not in the char tokenizer's vocabulary of {self.vocab_size}"
                " characters built from the corpus; use data.tokenizer='byte' or 'bpe'"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"char tokenizer cannot decode ids outside 0..{self.vocab_size - 1}")
        return "".join(self._itos[arr])

    def save(self, directory: Path) -> None:
        self._write_meta(Path(directory), chars="".join(self.chars))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: loaded from a tokenizer.json or trained here as byte-level BPE."""

    kind = "hf"

    def __init__(self, tok, name: str, *, eot_token: str | None, split_safe: bool = False) -> None:
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = eot_token
        self.eot_id = tok.token_to_id(eot_token) if eot_token is not None else None
        self.split_safe = split_safe
        # encode_batch_fast skips offset tracking; older `tokenizers` releases lack it.
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    @classmethod
    def from_file(cls, path: Path, name: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        try:
            tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad json
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"data.tokenizer: cannot load {path}: {msg}") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        eot = next((t for t in _KNOWN_EOT_TOKENS if t in vocab), None)
        return cls(tok, name if name is not None else str(path), eot_token=eot)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], *, vocab_size: int, name: str = "bpe") -> HFTokenizer:
        """Byte-level BPE (GPT-2 style) with "<|endoftext|>" as the end-of-document token."""
        from tokenizers import Tokenizer as _HF
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < _MIN_BPE_VOCAB:
            raise ValueError(
                f"data.bpe_vocab_size={vocab_size} is too small: byte-level BPE needs at least"
                f" {_MIN_BPE_VOCAB} (256 bytes + the end-of-text token)"
            )
        tok = _HF(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        # The GPT-2 split regex never joins a line break to the word before or after it, so
        # cutting a document at "word\nWord" keeps the ids identical.
        return cls(tok, name, eot_token=EOT_TOKEN, split_safe=True)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from a post-processor: corpus ids are the text only, separators are ours.
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._batch(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / HF_FILE))
        self._write_meta(directory, eot_token=self.eot_token, split_safe=self.split_safe)


def load_tokenizer(directory: Path) -> Tokenizer:
    """Reload what `Tokenizer.save` wrote; a folder with only a tokenizer.json loads that."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        if (directory / HF_FILE).is_file():
            return HFTokenizer.from_file(directory / HF_FILE)
        raise FileNotFoundError(f"no {META_FILE} or {HF_FILE} in tokenizer folder {directory}")
    meta = json.loads(meta_path.read_text())
    kind, name = meta.get("kind"), meta.get("name", "")
    if kind == "byte":
        return ByteTokenizer(name=name)
    if kind == "char":
        return CharTokenizer(meta["chars"], name=name)
    if kind == "hf":
        from tokenizers import Tokenizer as _HF

        tok = _HF.from_file(str(directory / HF_FILE))
        return HFTokenizer(
            tok, name, eot_token=meta.get("eot_token"), split_safe=bool(meta.get("split_safe"))
        )
    raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}")


def tokenizer_file(spec: str) -> Path | None:
    """The file a path spec names (a tokenizer.json, or a folder holding one), else None."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / META_FILE, p / HF_FILE):
            if candidate.is_file():
                return candidate
    return None


def build_tokenizer(
    spec: str, texts: Callable[[], Iterable[str]], *, bpe_vocab_size: int
) -> Tokenizer:
    """Make the tokenizer `data.tokenizer` names; `texts()` yields the corpus for char/bpe."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        return CharTokenizer.fit(texts())
    if spec == "bpe":
        return HFTokenizer.train_bpe(texts(), vocab_size=bpe_vocab_size)
    path = tokenizer_file(spec)
    if path is None:
        raise ValueError(
            f"data.tokenizer={spec!r} is not 'byte', 'char', 'bpe', or an existing tokenizer.json"
            " file or folder"
        )
    if path.name == META_FILE:
        return load_tokenizer(path.parent)
    return HFTokenizer.from_file(path, name=spec)
