"""Turn text files into a World-tokenized binidx corpus (the logic behind data_prep/make_binidx.py).

Conventions match RWKV-LM's make_data.py, so corpora are interchangeable:
every document is tokenized, followed by the end-of-document id 0, and
written as one binidx sequence (doc_idx = 0, 1, ..., n). Blank lines of a
.jsonl file are skipped. Unlike make_data.py nothing is shuffled or repeated:
training already visits windows in a scrambled order.

Inputs:
  *.jsonl  one JSON object per line; the document is the value of `text_key`
  other    the whole file (UTF-8) is one document
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence


from rwkv_train.data.binidx import BinIdxWriter, bin_path, dtype_for_vocab, idx_path, strip_suffix
from rwkv_train.errors import DataError
from rwkv_train.tokenizer import WorldTokenizer

# progress(documents_done, tokens_done, bytes_of_input_read)
ProgressFn = Callable[[int, int, int], None]


def sidecar_path(prefix: str | Path) -> Path:
    """`PREFIX.json`, the description written next to PREFIX.bin/.idx."""
    return Path(f"{strip_suffix(prefix)}.json")


def iter_documents(path: str | Path, text_key: str = "text") -> Iterator[tuple[bytes, int]]:
    """Yield (document as UTF-8 bytes, input bytes consumed) from one input file."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, text_key)
    else:
        yield _read_text(path), path.stat().st_size


def _iter_jsonl(path: Path, text_key: str) -> Iterator[tuple[bytes, int]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: {_utf8_problem(exc)}") from None
            if not line.strip():
                continue  # make_data.py skips blank lines too
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix or remove this line "
                    "(each line must be one JSON object)"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object like {{\"{text_key}\": \"...\"}}, "
                    f"got {type(record).__name__}; fix this line"
                )
            if text_key not in record:
                keys = ", ".join(map(repr, list(record)[:5])) or "none"
                raise DataError(
                    f"{where}: no key {text_key!r} (keys here: {keys}); pass the right key with --text-key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: {text_key!r} must be a string, got {type(text).__name__}; fix this line"
                )
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                # json.loads accepts lone surrogate escapes such as "\ud800".
                raise DataError(
                    f"{where}: {text_key!r} holds a lone surrogate escape (like \\ud800), which is not "
                    "text; remove it from this line"
                ) from None
            yield data, len(raw)


def _read_text(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        data.decode("utf-8")  # only to reject files in another encoding
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {_utf8_problem(exc)}") from None
    # A byte-order mark is not content; it would otherwise become a token.
    return data.removeprefix(b"\xef\xbb\xbf")


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8"


def _check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    if not inputs:
        raise DataError("no input files given; pass at least one --input FILE (.jsonl or text)")
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.exists():
            raise DataError(f"input {path} does not exist; check the --input path")
        if not path.is_file():
            raise DataError(f"input {path} is not a file; pass files (.jsonl or text), not directories")
    return paths


def _check_outputs(prefix: str, overwrite: bool) -> None:
    outputs = (bin_path(prefix), idx_path(prefix), sidecar_path(prefix))
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise DataError(
            f"output file(s) {', '.join(existing)} already exist; "
            "choose another --output prefix or pass --overwrite"
        )
    parent = outputs[0].parent
    if not parent.is_dir():
        raise DataError(
            f"output directory {parent} does not exist; create it first or choose another --output"
        )


def build_binidx(
    inputs: Sequence[str | Path],
    output: str | Path,
    text_key: str = "text",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Tokenize `inputs` into OUTPUT.bin/.idx plus the OUTPUT.json sidecar; return the sidecar.

    Either all three files appear or none does (existing ones are replaced
    only when `overwrite` is true and the build succeeds).
    """
    prefix = strip_suffix(output)
    paths = _check_inputs(inputs)
    _check_outputs(prefix, overwrite)  # before the slow part, not after
    tokenizer = WorldTokenizer()
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eod = tokenizer.eod_id
    bytes_read = 0
    with BinIdxWriter(prefix, dtype, overwrite=overwrite) as writer:
        for path in paths:
            for data, size in iter_documents(path, text_key):
                tokens = tokenizer.encode_bytes(data)
                tokens.append(eod)
                writer.add_document(tokens)
                bytes_read += size
                if progress is not None:
                    progress(writer.num_documents, writer.num_tokens, bytes_read)
        num_documents, num_tokens, max_id = writer.num_documents, writer.num_tokens, writer.max_token_id
        if num_documents == 0:
            # Raising inside the block makes the writer discard its temp files.
            raise DataError(f"the inputs hold no documents ({', '.join(map(str, paths))}); check the files")
    sidecar = {
        "tokenizer": "world",
        "vocab_size": tokenizer.vocab_size,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "max_token_id": max_id,
        "dtype": dtype.name,
        "sources": [str(p) for p in paths],
    }
    try:
        _write_json_atomic(sidecar_path(prefix), sidecar)
    except BaseException:
        # Keep the all-or-nothing promise: no corpus without its description.
        bin_path(prefix).unlink(missing_ok=True)
        idx_path(prefix).unlink(missing_ok=True)
        raise
    return sidecar


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
