"""Input files for make_binidx: finding them, reading them as streams, turning lines into documents.

An input is a file, a glob (expanded here, sorted) or a directory (every
.jsonl, .json, .txt below it, also as .gz / .zst, sorted); `-` is JSON lines
on standard input. Kinds, by the name without its compression suffix:

  .jsonl / .json  JSON lines: one object per line, the document under `text_key`
  anything else   plain text: the whole file is one document

Reading is split in two so that it can be parallel: the parent process cuts
the input into `RawBatch`es, blocks of whole raw lines (`iter_batches`, cheap:
no decoding, no per-line work), and `parse_batch` (run by the tokenizing
workers) splits, decodes, parses and checks them. Compressed files are decompressed as a stream; nothing holds a whole file
except a plain-text document, which is one document by definition.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from rwkv_train.errors import DataError

STDIN = "-"
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
COMPRESSION_SUFFIXES = (".gz", ".zst")
_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = "*?["
MAX_EXAMPLES = 5  # bad lines quoted in the summary of a --skip-bad run


@dataclass(frozen=True)
class Source:
    """One input stream."""

    path: str  # as shown in messages; "-" for standard input
    kind: str  # "jsonl" or "text"
    compression: str | None  # "gz", "zst" or None
    size: int | None  # bytes on disk (None for standard input)


def classify(path: str | Path) -> tuple[str, str | None]:
    """(kind, compression) of a file name: `a.jsonl.zst` -> ("jsonl", "zst")."""
    name = Path(path).name.lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    kind = "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"
    return kind, compression


def _wanted_in_directory(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith("."):
        return False  # editor swap files, .DS_Store and the like
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)


def _source(path: Path) -> Source:
    kind, compression = classify(path)
    return Source(str(path), kind, compression, path.stat().st_size)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Source]:
    """Files, globs and directories -> the input files in order (each group sorted)."""
    if not inputs:
        raise DataError("no input given; pass at least one --input FILE, GLOB or DIRECTORY")
    sources: list[Source] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if text == STDIN:
            sources.append(Source(STDIN, "jsonl", None, None))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _wanted_in_directory(p))
            if not found:
                raise DataError(
                    f"input directory {path} holds no .jsonl, .json or .txt files (nor their .gz/.zst "
                    "forms); point --input at the files or a glob such as 'DIR/**/*.md'"
                )
            sources.extend(_source(p) for p in found)
        elif path.is_file():
            sources.append(_source(path))
        elif path.exists():
            raise DataError(f"input {path} is not a file or directory; pass .jsonl/.txt files, globs or folders")
        elif any(c in text for c in _GLOB_CHARS):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(
                    f"input glob {text!r} matches no files; check the pattern and quote it "
                    "(--input 'data/*.jsonl') so that the shell passes it through"
                )
            sources.extend(_source(p) for p in found)
        else:
            raise DataError(f"input {path} does not exist; check the --input path")
    if sum(s.path == STDIN for s in sources) > 1:
        raise DataError("standard input (-) can be read once only; pass --input - at most once")
    return sources


@contextmanager
def open_source(source: Source) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(decompressed stream, underlying raw file): the raw file's tell() is the progress on disk."""
    if source.path == STDIN:
        yield sys.stdin.buffer, sys.stdin.buffer
        return
    with open(source.path, "rb") as raw:
        if source.compression == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, raw
        elif source.compression == "zst":
            try:
                import zstandard
            except ImportError:
                raise DataError(
                    f"{source.path} is zstd-compressed and the `zstandard` package is not installed; "
                    "run `pip install zstandard`"
                ) from None
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, buffer_size=1 << 20) as stream:
                yield stream, raw
        else:
            yield raw, raw


@dataclass
class RawBatch:
    """Undecoded input handed to a tokenizing worker."""

    source: str
    kind: str
    first_line: int  # line number of the first line in `data`
    data: bytes  # jsonl: whole lines (the last may lack its newline); text: the whole file
    input_bytes: int = 0  # bytes of the input on disk read for this batch (for progress)


def _tell(raw: BinaryIO) -> int:
    try:
        return raw.tell()
    except (OSError, ValueError):
        return 0  # a pipe


def _blocks(stream: BinaryIO, batch_bytes: int) -> Iterator[bytes]:
    """Blocks of whole lines, each about `batch_bytes` or one line if longer; the last block
    may lack a final newline. read1 returns what a pipe has instead of waiting for a full block."""
    read = getattr(stream, "read1", stream.read)
    pieces: list[bytes] = []
    size = 0
    while True:
        chunk = read(batch_bytes)
        if not chunk:
            break
        pieces.append(chunk)
        size += len(chunk)
        if size < batch_bytes:
            continue
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            continue  # inside a long line: read on to its end
        rest = chunk[cut:]
        pieces[-1] = chunk[:cut]
        yield b"".join(pieces)
        pieces, size = ([rest], len(rest)) if rest else ([], 0)
    if pieces:
        yield b"".join(pieces)


def iter_batches(sources: Sequence[Source], batch_bytes: int) -> Iterator[RawBatch]:
    """Cut the inputs into batches of about `batch_bytes` of whole lines, in input order."""
    if batch_bytes < 1:
        raise DataError(f"batch size must be positive, got {batch_bytes} bytes")
    for source in sources:
        try:
            with open_source(source) as (stream, raw):
                if source.kind == "text":
                    data = stream.read()
                    yield RawBatch(source.path, "text", 1, data, source.size or len(data))
                    continue
                first, reported = 1, 0
                for block in _blocks(stream, batch_bytes):
                    position = _tell(raw) if source.size is not None else reported + len(block)
                    yield RawBatch(source.path, "jsonl", first, block, position - reported)
                    first += block.count(b"\n")
                    reported = position
                if source.size is not None and reported < source.size:  # e.g. the rest of a .gz trailer
                    yield RawBatch(source.path, "jsonl", first, b"", source.size - reported)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{source.path}: cannot be read ({exc}); check the file (is it cut short?)") from None
        except Exception as exc:  # zstandard.ZstdError, raised while decompressing
            if type(exc).__module__.startswith("zstandard"):
                raise DataError(f"{source.path}: not valid zstd data ({exc}); check the file") from None
            raise


@dataclass(frozen=True)
class ParseOptions:
    """How documents are taken out of the input lines."""

    text_key: str = "text"
    skip_bad: bool = False  # count and skip bad lines instead of stopping
    errors: str = "strict"  # invalid UTF-8: "strict" stops (or skips), "replace" puts U+FFFD


@dataclass
class ParseStats:
    """What was left out, to report at the end."""

    empty: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)  # the first few bad lines, "file:line: why"

    def add_bad(self, message: str) -> None:
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def merge(self, other: "ParseStats") -> None:
        self.empty += other.empty
        self.bad += other.bad
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 ({exc.reason} at byte {exc.start})"


_FIX_UTF8 = "re-save the file as UTF-8, or pass --errors replace (U+FFFD for bad bytes) or --skip-bad"
_FIX_LINE = "fix or remove this line, or pass --skip-bad to skip such lines"


def parse_batch(batch: RawBatch, options: ParseOptions) -> tuple[list[str], list[int], ParseStats]:
    """Documents of a batch: (texts, their line numbers, stats). Raises DataError on a bad line
    unless `options.skip_bad`; empty documents are counted, never returned."""
    stats = ParseStats()
    texts: list[str] = []
    where: list[int] = []
    if batch.kind == "text":
        text = _parse_text(batch, options, stats)
        if text is not None:
            if text:
                texts.append(text)
                where.append(1)
            else:
                stats.empty += 1
        return texts, where, stats
    key, replace = options.text_key, options.errors == "replace"
    for i, raw in enumerate(batch.data.split(b"\n")):
        line_no = batch.first_line + i
        if line_no == 1:
            raw = raw.removeprefix(_BOM)
        if not raw.strip():
            continue  # blank lines are no documents (RWKV-LM's make_data.py skips them too)
        place = f"{batch.source}:{line_no}"
        try:
            line = raw.decode("utf-8", errors="replace" if replace else "strict")
            record = json.loads(line)
        except UnicodeDecodeError as exc:
            _bad(stats, options, f"{place}: {_utf8_problem(exc)}", _FIX_UTF8)
            continue
        except json.JSONDecodeError as exc:
            _bad(stats, options, f"{place}: malformed JSON ({exc.msg} at column {exc.colno})",
                 f"each line must be one JSON object (.jsonl and .json inputs are JSON lines); {_FIX_LINE}")
            continue
        if not isinstance(record, dict):
            _bad(stats, options, f"{place}: expected a JSON object like {{\"{key}\": \"...\"}}, "
                 f"got {type(record).__name__}", _FIX_LINE)
            continue
        if key not in record:
            keys = ", ".join(map(repr, list(record)[:5])) or "none"
            _bad(stats, options, f"{place}: no key {key!r} (keys here: {keys})",
                 "pass the right key with --text-key, or --skip-bad to skip such lines")
            continue
        text = record[key]
        if not isinstance(text, str):
            _bad(stats, options, f"{place}: {key!r} must be a string, got {type(text).__name__}", _FIX_LINE)
            continue
        if not text:
            stats.empty += 1
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # json.loads accepts lone surrogate escapes such as "\ud800", which are not text.
            if replace:
                text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            else:
                _bad(stats, options, f"{place}: {key!r} holds a lone surrogate escape (like \\ud800), "
                     "which is not text", "remove it, or pass --errors replace or --skip-bad")
                continue
        texts.append(text)
        where.append(line_no)
    return texts, where, stats


def _parse_text(batch: RawBatch, options: ParseOptions, stats: ParseStats) -> str | None:
    data = batch.data.removeprefix(_BOM)  # a byte-order mark is not content
    try:
        return data.decode("utf-8", errors="replace" if options.errors == "replace" else "strict")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        _bad(stats, options, f"{batch.source}:{line}: {_utf8_problem(exc)}", _FIX_UTF8)
        return None


def _bad(stats: ParseStats, options: ParseOptions, problem: str, fix: str) -> None:
    if not options.skip_bad:
        raise DataError(f"{problem}; {fix}")
    stats.add_bad(problem)


def iter_documents(
    inputs: Sequence[str | Path], options: ParseOptions = ParseOptions(), batch_bytes: int = 1 << 20
) -> Iterator[str]:
    """Every document of the inputs as text, in order (one process; for tools and tests)."""
    for batch in iter_batches(expand_inputs(inputs), batch_bytes):
        yield from parse_batch(batch, options)[0]
