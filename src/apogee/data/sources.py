"""Corpus sources: where documents come from, read in one deterministic order.

A source is named by `data.source` and found at `data.path`. Reading is streaming (one file, one
parquet batch at a time) so a corpus larger than memory can be tokenised. `fingerprint` is what the
prepared-corpus cache is keyed on: file names, sizes and modification times, never the contents,
so checking the cache costs a directory walk and not a read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SOURCES = ("text", "stdlib", "jsonl", "parquet", "bin")
# The stdlib corpus is a demo/default corpus; 8 MiB tokenises in seconds on a laptop.
STDLIB_MAX_BYTES = 8 * 1024 * 1024
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# A file whose first bytes hold a NUL and is not UTF-8 is treated as binary and skipped.
_BINARY_SNIFF_BYTES = 8192


def default_max_bytes(source: str, max_bytes: int | None) -> int | None:
    """`max_bytes` as given, or the stdlib default cap when it is None."""
    if max_bytes is None and source == "stdlib":
        return STDLIB_MAX_BYTES
    return max_bytes


def list_files(source: str, path: str | Path | None, *, glob: str = "**/*.txt") -> list[Path]:
    """The input files of a source, sorted by path relative to their root."""
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "stdlib":
        return _stdlib_files()
    root = _existing_path(source, path)
    if root.is_file():
        return [root]
    patterns = {
        "text": [glob],
        "jsonl": ["**/*.jsonl", "**/*.jsonl.gz"],
        "parquet": ["**/*.parquet"],
        "bin": ["**/*.bin"],
    }[source]
    found = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    if not files:
        wanted = f"data.glob={glob!r}" if source == "text" else " or ".join(patterns)
        raise ValueError(f"data.path: no files matching {wanted} under {root}")
    return files


def iter_documents(
    source: str,
    path: str | Path | None,
    *,
    text_key: str = "text",
    glob: str = "**/*.txt",
    max_bytes: int | None = None,
) -> Iterator[str]:
    """Yield the documents of a corpus in a fixed order, stopping at `max_bytes` of UTF-8 text.

    The document that crosses `max_bytes` is cut so the total is exactly the cap (None: no cap;
    for "stdlib" None means STDLIB_MAX_BYTES).
    """
    if source == "bin":
        raise ValueError("data.source='bin' holds token ids, not documents; it is memory-mapped")
    max_bytes = default_max_bytes(source, max_bytes)
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"data.max_bytes={max_bytes} must be positive (or unset for no cap)")
    files = list_files(source, path, glob=glob)
    reader = {
        "text": _read_text,
        "stdlib": _read_text,
        "jsonl": lambda f: _read_jsonl(f, text_key),
        "parquet": lambda f: _read_parquet(f, text_key),
    }[source]
    total = 0
    for f in files:
        for doc in reader(f):
            if max_bytes is None:
                yield doc
                continue
            raw = doc.encode("utf-8")
            if total + len(raw) >= max_bytes:
                # Cutting mid-character would leave a broken byte; "ignore" drops just that one.
                yield raw[: max_bytes - total].decode("utf-8", errors="ignore")
                return
            total += len(raw)
            yield doc


def fingerprint(
    source: str,
    path: str | Path | None,
    *,
    glob: str = "**/*.txt",
) -> str:
    """sha256 of the input file list: (relative path, size, mtime_ns) of each, plus the root."""
    files = list_files(source, path, glob=glob)
    root = _stdlib_root() if source == "stdlib" else _existing_path(source, path)
    base = root if root.is_dir() else root.parent
    h = hashlib.sha256()
    # The stdlib of another Python version is another corpus even where the files look alike.
    extra = sys.version if source == "stdlib" else ""
    h.update(json.dumps([source, str(root.resolve()), extra]).encode())
    for f in files:
        st = f.stat()
        h.update(json.dumps([f.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _existing_path(source: str, path: str | Path | None) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"data.path must be set for data.source={source!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path: {p} does not exist")
    return p


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: the Python standard library was not found at {root}")
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(f: Path) -> Iterator[str]:
    raw = f.read_bytes()
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        if b"\x00" in raw[:_BINARY_SNIFF_BYTES]:
            return  # a binary file that matched the glob: not text, skip it
        # Text in a legacy encoding: keep it, with the odd byte shown as U+FFFD.
        yield raw.decode("utf-8", errors="replace")


def _read_jsonl(f: Path, text_key: str) -> Iterator[str]:
    opener = gzip.open if f.name.endswith(".gz") else open
    with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                raise ValueError(
                    f"{f}:{lineno}: no field {text_key!r}; set data.text_key to the text field"
                )
            text = obj[text_key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{f}:{lineno}: field {text_key!r} is {type(text).__name__}, not a string;"
                    " set data.text_key to the text field"
                )
            yield text


def _read_parquet(f: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    if text_key not in pf.schema_arrow.names:
        cols = ", ".join(pf.schema_arrow.names)
        raise ValueError(
            f"{f}: no column {text_key!r} (columns: {cols}); set data.text_key to the text column"
        )
    # Batches within row groups keep memory to one batch even for multi-GB files.
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            if text is not None:
                yield text if isinstance(text, str) else str(text)
