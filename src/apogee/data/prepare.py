"""Turn a corpus into one flat file of token ids, once, and memory-map it on every later run.

The cache lives in `cache_dir/<source>-<tokenizer>-<key>/` where the key hashes everything that
changes the ids (input file list, tokenizer, its settings, the byte cap, this file's format). A
cache folder is built under a temporary name and renamed into place in one `os.replace`, so a
crash leaves no half cache and two ranks racing both end up reading the same complete folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from apogee.data.sources import (
    SOURCES,
    default_max_bytes,
    fingerprint,
    iter_documents,
    list_files,
)
from apogee.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer, tokenizer_file

# Bump when the layout of tokens.bin/meta.json or the way documents are joined changes.
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
BIN_DTYPES = ("uint16", "uint32")
# Documents are encoded in batches of about this many characters so the `tokenizers` library can
# spread a batch over threads; long documents are cut into pieces of this size where that is exact.
_BATCH_CHARS = 4 * 1024 * 1024
_PIECE_CHARS = 256 * 1024
_BATCH_DOCS = 1024
_COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PreparedCorpus:
    tokens: np.ndarray  # read-only np.memmap, shape (num_tokens,), uint16 or uint32
    tokenizer: Tokenizer
    vocab_size: int
    cache_path: Path

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def prepare_corpus(
    *,
    source: str,
    path: str | None,
    tokenizer: str,
    bpe_vocab_size: int = 8192,
    text_key: str = "text",
    glob: str = "**/*.txt",
    max_bytes: int | None = None,
    bin_dtype: str = "uint16",
    cache_dir: Path,
    progress: bool = True,
) -> PreparedCorpus:
    """Tokenise `data.source` at `data.path` with `data.tokenizer`, or reuse the cached result."""
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "bin" and bin_dtype not in BIN_DTYPES:
        raise ValueError(f"data.bin_dtype={bin_dtype!r} is not one of {', '.join(BIN_DTYPES)}")
    max_bytes = default_max_bytes(source, max_bytes)
    cache_dir = Path(cache_dir).expanduser()
    name = _cache_name(
        source=source,
        path=path,
        tokenizer=tokenizer,
        bpe_vocab_size=bpe_vocab_size,
        text_key=text_key,
        glob=glob,
        max_bytes=max_bytes,
        bin_dtype=bin_dtype,
    )
    final = cache_dir / name
    if (final / META_FILE).is_file():
        corpus = _load(final)
        _say(progress, f"cached corpus {final}: {corpus.num_tokens:,} tokens, "
             f"vocab {corpus.vocab_size:,}")
        return corpus
    if final.exists():
        raise RuntimeError(
            f"cache folder {final} has no {META_FILE} (not written by apogee); delete it"
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if source == "bin":
            meta = _build_bin(
                tmp, source=source, path=path, tokenizer=tokenizer, bin_dtype=bin_dtype,
                progress=progress,
            )
        else:
            meta = _build_from_documents(
                tmp,
                source=source,
                path=path,
                tokenizer=tokenizer,
                bpe_vocab_size=bpe_vocab_size,
                text_key=text_key,
                glob=glob,
                max_bytes=max_bytes,
                progress=progress,
            )
        meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def _cache_name(
    *,
    source: str,
    path: str | None,
    tokenizer: str,
    bpe_vocab_size: int,
    text_key: str,
    glob: str,
    max_bytes: int | None,
    bin_dtype: str,
) -> str:
    # Settings that cannot change the ids are left out so that changing them reuses the cache.
    if tokenizer in ("byte", "char", "bpe"):
        tok_key: object = tokenizer
        label = f"bpe{bpe_vocab_size}" if tokenizer == "bpe" else tokenizer
    else:
        tok_path = tokenizer_file(tokenizer)
        if tok_path is None:  # build_tokenizer would say the same; say it before any work
            raise ValueError(
                f"data.tokenizer={tokenizer!r} is not 'byte', 'char', 'bpe', or an existing"
                " tokenizer.json file or folder"
            )
        tok_key = ["file", hashlib.sha256(tok_path.read_bytes()).hexdigest()]
        label = "file"
    key = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(source, path, glob=glob),
        "tokenizer": tok_key,
        "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None,
        "text_key": text_key if source in ("jsonl", "parquet") else None,
        "max_bytes": max_bytes if source != "bin" else None,
        "bin_dtype": bin_dtype if source == "bin" else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{source}-{label}-{digest[:16]}"


def _build_from_documents(
    tmp: Path,
    *,
    source: str,
    path: str | None,
    tokenizer: str,
    bpe_vocab_size: int,
    text_key: str,
    glob: str,
    max_bytes: int | None,
    progress: bool,
) -> dict:
    def documents() -> Iterator[str]:
        return iter_documents(source, path, text_key=text_key, glob=glob, max_bytes=max_bytes)

    if tokenizer in ("char", "bpe"):
        _say(progress, f"fitting {tokenizer} tokenizer on the corpus")
    tok = build_tokenizer(tokenizer, documents, bpe_vocab_size=bpe_vocab_size)
    tok.save(tmp / TOKENIZER_DIR)
    dtype = _token_dtype(tok.vocab_size)
    sep = np.asarray(tok.separator_ids(), dtype=dtype)
    meter = _Progress(progress)
    with open(tmp / TOKENS_FILE, "wb") as out:
        for pieces, starts in _batches(documents(), split=tok.split_safe):
            for piece, starts_doc, ids in zip(pieces, starts, tok.encode_batch(pieces)):
                if starts_doc and meter.docs:
                    out.write(sep.tobytes())
                    meter.tokens += sep.size
                if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                    raise ValueError(
                        f"data.tokenizer={tokenizer!r} produced id {int(ids.max())} outside its"
                        f" vocabulary of {tok.vocab_size}"
                    )
                out.write(ids.astype(dtype).tobytes())
                meter.docs += starts_doc
                meter.bytes += len(piece.encode("utf-8"))
                meter.tokens += ids.size
            meter.tick()
    meter.done()
    if meter.tokens == 0:
        raise ValueError(f"data.path: data.source={source!r} at {path} gave no text to tokenise")
    return {
        "format_version": FORMAT_VERSION,
        "num_tokens": meter.tokens,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "source": source,
        "path": None if path is None else str(Path(path).expanduser().resolve()),
        "tokenizer": tokenizer,
        "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None,
        "text_key": text_key,
        "glob": glob,
        "max_bytes": max_bytes,
        "num_documents": meter.docs,
        "num_bytes": meter.bytes,
        "seconds": round(meter.elapsed(), 3),
    }


def _build_bin(
    tmp: Path,
    *,
    source: str,
    path: str | None,
    tokenizer: str,
    bin_dtype: str,
    progress: bool,
) -> dict:
    if tokenizer in ("char", "bpe"):
        raise ValueError(
            f"data.tokenizer={tokenizer!r} cannot read data.source='bin': the ids come from an"
            " existing tokenizer; set data.tokenizer to 'byte' or the path of its tokenizer.json"
        )
    tok = build_tokenizer(tokenizer, lambda: (), bpe_vocab_size=0)
    tok.save(tmp / TOKENIZER_DIR)
    files = list_files("bin", path)
    itemsize = np.dtype(bin_dtype).itemsize
    total = 0
    for f in files:
        size = f.stat().st_size
        if size % itemsize:
            raise ValueError(
                f"{f} is {size} bytes, not a whole number of {bin_dtype} tokens;"
                " check data.bin_dtype"
            )
        if size:
            _check_ids(np.memmap(f, dtype=bin_dtype, mode="r"), f, tok, tokenizer, bin_dtype)
        total += size // itemsize
    if total == 0:
        raise ValueError(f"data.path: the .bin files at {path} hold no tokens")
    meta = {
        "format_version": FORMAT_VERSION,
        "num_tokens": total,
        "dtype": bin_dtype,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "source": source,
        "path": str(Path(path).expanduser().resolve()),  # list_files checked it is set
        "tokenizer": tokenizer,
        "files": [str(f.resolve()) for f in files],
    }
    if len(files) == 1:
        # One file is used where it lies; copying gigabytes to rename them would buy nothing.
        meta["tokens_file"] = str(files[0].resolve())
    else:
        _say(progress, f"joining {len(files)} .bin files ({total:,} tokens) into one")
        with open(tmp / TOKENS_FILE, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
    _say(progress, f"{len(files)} .bin file(s): {total:,} tokens, vocab {tok.vocab_size:,}")
    return meta


def _check_ids(ids: np.ndarray, f: Path, tok: Tokenizer, spec: str, bin_dtype: str) -> None:
    """Max id on a sample (head, tail, 16 windows between) must fit the tokenizer's vocabulary."""
    n, w = ids.shape[0], 1 << 16
    starts = {0, max(0, n - w), *np.linspace(0, max(0, n - w), 16, dtype=np.int64).tolist()}
    top = max(int(ids[s : s + w].max()) for s in starts)
    if top >= tok.vocab_size:
        raise ValueError(
            f"{f} holds token id {top} but data.tokenizer={spec!r} has only {tok.vocab_size} ids;"
            f" set data.tokenizer to the tokenizer that made the file (or data.bin_dtype if it is"
            f" not {bin_dtype})"
        )


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:
        # Another rank or process renamed its identical folder first; theirs is as good as ours.
        if not (final / META_FILE).is_file():
            raise


def _load(final: Path) -> PreparedCorpus:
    meta = json.loads((final / META_FILE).read_text())
    tokens_path = Path(meta.get("tokens_file") or final / TOKENS_FILE)
    dtype = np.dtype(meta["dtype"])
    n = int(meta["num_tokens"])
    if not tokens_path.is_file() or tokens_path.stat().st_size != n * dtype.itemsize:
        raise RuntimeError(
            f"prepared corpus {final} does not match {tokens_path} ({n:,} {dtype.name} tokens"
            " expected); delete the cache folder to rebuild it"
        )
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n,))
    tok = load_tokenizer(final / TOKENIZER_DIR)
    return PreparedCorpus(
        tokens=tokens, tokenizer=tok, vocab_size=int(meta["vocab_size"]), cache_path=final
    )


def _token_dtype(vocab_size: int) -> type:
    # Ids run 0..vocab_size-1, so a vocabulary of exactly 65536 still fits uint16.
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _batches(docs: Iterable[str], *, split: bool) -> Iterator[tuple[list[str], list[bool]]]:
    """Group documents (cut into pieces when `split`) into batches for `encode_batch`.

    Yields (pieces, starts) where starts[i] says piece i begins a new document.
    """
    pieces: list[str] = []
    starts: list[bool] = []
    chars = 0
    for doc in docs:
        if not doc:
            continue  # an empty file or record would only add a stray separator
        parts = _split_document(doc, _PIECE_CHARS) if split else [doc]
        for i, part in enumerate(parts):
            pieces.append(part)
            starts.append(i == 0)
            chars += len(part)
            if chars >= _BATCH_CHARS or len(pieces) >= _BATCH_DOCS:
                yield pieces, starts
                pieces, starts, chars = [], [], 0
    if pieces:
        yield pieces, starts


def _split_document(text: str, target: int) -> list[str]:
    """Cut `text` into pieces of about `target` characters, only right after a line break that
    has a non-space character on both sides, where split-safe tokenizers give the same ids."""
    if len(text) <= target:
        return [text]
    pieces, begin, pos = [], 0, target
    while len(text) - begin > target:
        j = text.find("\n", pos)
        if j < 0:
            break
        cut = j + 1
        if cut < len(text) and j > begin and not text[j - 1].isspace() and not text[cut].isspace():
            pieces.append(text[begin:cut])
            begin, pos = cut, cut + target
        else:
            pos = cut
    pieces.append(text[begin:])
    return pieces


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"apogee data: {message}", file=sys.stderr, flush=True)


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, plain lines in a log."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        # A log file gets a line every few seconds rather than the terminal's twice a second.
        self.interval = 0.5 if self.tty else 5.0
        self.start = self.last = time.monotonic()
        self.docs = self.bytes = self.tokens = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _line(self) -> str:
        secs = max(self.elapsed(), 1e-9)
        return (
            f"apogee data: {self.docs:,} docs  {self.bytes / 1e6:,.1f} MB  {self.tokens:,} tokens"
            f"  {self.tokens / secs / 1e6:,.2f}M tok/s"
        )

    def tick(self) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        if self.tty:  # \x1b[K clears what a longer previous line left behind
            print(f"\r{self._line()}\x1b[K", end="", file=sys.stderr, flush=True)
        else:
            print(self._line(), file=sys.stderr, flush=True)

    def done(self) -> None:
        if not self.enabled:
            return
        prefix = "\r" if self.tty else ""
        print(f"{prefix}{self._line()}  done in {self.elapsed():.1f}s", file=sys.stderr, flush=True)
