"""Readers: input specs (files, folders, globs, `builtin:<name>`) -> documents as `str`.

Formats by suffix: .txt/.md, .jsonl, .json, .parquet; text formats may be .gz or .zst compressed.
Problems with single documents or files are counted and reading goes on; what the user must fix (a
missing path, an unsupported or corrupt file) raises MobileLLMError. A truncated or corrupt compressed
stream is such an error unless `allow_truncated` keeps the documents before it (docs/data.md)."""

from __future__ import annotations

import glob
import gzip
import io
import json
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from mobilellm.errors import MobileLLMError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
TXT_MODES = ("file", "line", "paragraph")

# Counter keys. "documents" counts what was read; the rest say why something was not (or was changed).
SKIP_REASONS = {
    "empty_document": "documents with no text",
    "invalid_json": "JSON lines that do not parse",
    "missing_field": "JSON records / parquet rows without a string text field",
    "empty_file": "empty files",
    "binary_file": "files that look binary (NUL bytes)",
    "damaged_file": "truncated or corrupt compressed files (only the documents before the damage kept)",
}
UTF8_REPLACED = "utf8_replaced"  # documents whose invalid UTF-8 was replaced with U+FFFD (kept)

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def format_of(path: Path) -> tuple[str, str | None]:
    """('text' | 'json' | 'parquet', compression or None) from the file name; raises for anything else."""
    last = path.suffix.lower()
    compression = None
    if last in COMPRESSED_SUFFIXES:
        compression = "gzip" if last == ".gz" else "zstd"
    base = _base_suffix(path)
    if base in TEXT_SUFFIXES:
        return "text", compression
    if base in JSON_SUFFIXES:
        return "json", compression
    if base in PARQUET_SUFFIXES and compression is None:
        return "parquet", None
    raise MobileLLMError(f"unsupported input file {path}: expected .txt, .md, .jsonl, .json or .parquet "
                         f"(text formats optionally .gz or .zst compressed)")


def is_supported(path: Path) -> bool:
    try:
        format_of(path)
        return True
    except MobileLLMError:
        return False


def resolve_input(spec: str) -> list[Path]:
    """Files named by a path, folder (recursive; hidden entries and prepared-data folders skipped) or glob."""
    if any(ch in spec for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
        files = [m for m in matches if m.is_file() and is_supported(m)]
        if not files:
            what = "no files" if not matches else "no .txt/.md/.jsonl/.json/.parquet files"
            raise MobileLLMError(f"input glob {spec!r} matches {what}; check the pattern (quote it in the shell)")
        return files
    path = Path(spec)
    if path.is_file():
        format_of(path)  # raises for unsupported suffixes
        return [path]
    if path.is_dir():
        files = sorted(_walk(path), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise MobileLLMError(f"input folder {path} holds no .txt/.md/.jsonl/.json/.parquet files")
        return files
    raise MobileLLMError(f"input not found: {spec}; pass an existing file, folder or glob")


def _walk(root: Path) -> Iterator[Path]:
    for child in root.iterdir():
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if not (child / "manifest.json").is_file():  # a `mobilellm prepare` output is not input
                yield from _walk(child)
        elif child.is_file() and is_supported(child):
            yield child


def _open_binary(raw: BinaryIO, compression: str | None) -> BinaryIO:
    """The decompressed bytes of the open file `raw` (its position says how far the decoder has read)."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # several members in turn; EOFError when cut short
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    return raw


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames one after the other (pzstd and `cat a.zst b.zst` make several), raising
    EOFError when the file ends inside a frame: zstandard's stream reader stops quietly there."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._frame = None  # the decoder of the frame being read, None between frames
        self._out, self._used = b"", 0  # decoded bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._used == len(self._out):
            data = self._raw.read(1 << 14)  # small reads: a corrupt spot is located to within 16 KiB
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._used = self._decode(data), 0
        n = min(len(buffer), len(self._out) - self._used)
        buffer[:n] = self._out[self._used:self._used + n]
        self._used += n
        return n

    def _decode(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._frame is None:
                # Frames made with a long window (zstd --long=28 and up) exceed the decoder's default
                # 128 MiB limit; allow up to 2 GiB, zstd's maximum.
                self._frame = self._zstd.ZstdDecompressor(max_window_size=2**31).decompressobj()
            parts.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # the frame is complete; what follows starts the next one
                data, self._frame = self._frame.unused_data, None
        return b"".join(parts)


def _decode(data: bytes, counts: Counter) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counts[UTF8_REPLACED] += 1
        return data.decode("utf-8", errors="replace")


def _clean_surrogates(text: str, counts: Counter) -> str:
    # JSON "\\ud800" escapes give lone surrogates, which are not valid Unicode text (tokenizers rejects them).
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        counts[UTF8_REPLACED] += 1
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def read_documents(path: str | Path, text_field: str = "text", counts: Counter | None = None, txt_mode: str = "file",
                   warn: Warn = warn_stderr, allow_truncated: bool = False) -> Iterator[str]:
    """Yield the documents of one file, counting skips and repairs in `counts` (allow_truncated: module doc)."""
    path = Path(path)
    counts = Counter() if counts is None else counts
    kind, compression = format_of(path)
    if txt_mode not in TXT_MODES:
        raise MobileLLMError(f"unknown text mode {txt_mode!r}; choose from {', '.join(TXT_MODES)}")
    if path.stat().st_size == 0:
        counts["empty_file"] += 1
        warn(f"{path} is empty; skipped")
        return
    if kind == "parquet":
        yield from _read_parquet(path, text_field, counts)
        return
    before = counts["documents"]
    try:
        with open(path, "rb") as raw, _open_binary(raw, compression) as fh:
            try:
                yield from _read_stream(fh, kind, path, text_field, counts, txt_mode, warn)
            except _decompress_errors() as err:  # raised while the file is open: raw.tell() is where it broke
                where = (f"is truncated: its {compression} stream stops at byte {raw.tell():,}, in the middle of "
                         f"the data" if isinstance(err, EOFError) else
                         f"is corrupt: decoding failed by byte {raw.tell():,} ({_one_line(err)})")
                read = counts["documents"] - before
                if not allow_truncated:
                    raise MobileLLMError(f"{path} {where}; {read:,} documents were read before it. Re-create or "
                                         f"re-download the file, or pass --allow-truncated to keep what was "
                                         f"read") from None
                counts["damaged_file"] += 1
                warn(f"{path} {where}: kept the {read:,} documents read before it (--allow-truncated); "
                     f"the rest of the file is LOST")
    except OSError as err:
        raise MobileLLMError(f"cannot read {path}: {_one_line(err)}") from None


def _read_stream(fh: BinaryIO, kind: str, path: Path, text_field: str, counts: Counter, txt_mode: str,
                 warn: Warn) -> Iterator[str]:
    head = fh.peek(8192)[:8192] if hasattr(fh, "peek") else b""
    if b"\0" in head:
        counts["binary_file"] += 1
        warn(f"{path} looks binary (NUL bytes), not text; skipped")
        return
    if not head:
        counts["empty_file"] += 1
        warn(f"{path} is empty after decompression; skipped")
        return
    if kind == "text":
        yield from _read_text(fh, counts, txt_mode)
    else:
        yield from _read_json(fh, path, text_field, counts, warn)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _emit(text: str, counts: Counter) -> Iterator[str]:
    if text.strip():
        counts["documents"] += 1
        yield text
    else:
        counts["empty_document"] += 1


def _read_text(fh: BinaryIO, counts: Counter, mode: str) -> Iterator[str]:
    if mode == "file":
        yield from _emit(_decode(fh.read(), counts), counts)
        return
    para: list[bytes] = []
    for line in fh:
        if mode == "line":
            if line.strip():
                yield from _emit(_decode(line.rstrip(b"\r\n"), counts), counts)
        elif line.strip():
            para.append(line)
        elif para:  # a blank line ends a paragraph
            yield from _emit(_decode(b"".join(para).rstrip(b"\r\n"), counts), counts)
            para = []
    if para:
        yield from _emit(_decode(b"".join(para).rstrip(b"\r\n"), counts), counts)


def _record_text(record, text_field: str, counts: Counter) -> str | None:
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return _clean_surrogates(record[text_field], counts)
    counts["missing_field"] += 1
    return None


def _read_json(fh: BinaryIO, path: Path, text_field: str, counts: Counter, warn: Warn) -> Iterator[str]:
    local = Counter()  # this file's counts, for the wrong-field check below
    sample = None
    lines: Iterable[bytes] = fh
    if _base_suffix(path) == ".json":
        # .json: a whole-file array or object; many ".json" files are JSON lines, so fall back to that.
        data = fh.read()
        try:
            try:
                parsed = json.loads(data)
            except UnicodeDecodeError:
                parsed = json.loads(data.decode("utf-8", errors="replace"))
                local[UTF8_REPLACED] += 1
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, (list, dict)):
            records = parsed if isinstance(parsed, list) else [parsed]
            sample = records[0] if records else None
            try:
                for record in records:
                    if isinstance(record, str):
                        record = {text_field: record}
                    text = _record_text(record, text_field, local)
                    if text is not None:
                        yield from _emit(text, local)
                _check_field(path, text_field, local, sample)
            finally:
                counts.update(local)
            return
        lines = io.BytesIO(data)
    warned = set()
    try:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                try:
                    record = json.loads(line.decode("utf-8", errors="replace"))
                    local[UTF8_REPLACED] += 1
                except json.JSONDecodeError:
                    record = _BAD
            except json.JSONDecodeError:
                record = _BAD
            if record is _BAD:
                problem, text = "invalid_json", None
                local[problem] += 1
            else:
                sample = record if sample is None else sample
                problem, text = "missing_field", _record_text(record, text_field, local)
            if text is None:
                if problem not in warned:
                    warned.add(problem)
                    what = "is not valid JSON" if problem == "invalid_json" else f"has no string {text_field!r} field"
                    warn(f"{path} line {lineno} {what}; skipping such lines (counted in the summary)")
                continue
            yield from _emit(text, local)
        _check_field(path, text_field, local, sample)
    finally:  # also when the consumer stops early
        counts.update(local)


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


_BAD = object()


def _check_field(path: Path, text_field: str, local: Counter, sample) -> None:
    # Not one record of the file had the field: almost surely the wrong --text-field, so stop and
    # show the fields we saw instead of skipping the whole file quietly.
    if local["missing_field"] > 0 and not local["documents"] and not local["empty_document"]:
        keys = sorted(sample) if isinstance(sample, dict) else []
        raise MobileLLMError(f"no record in {path} has a string {text_field!r} field"
                             + (f" (fields: {', '.join(keys)})" if keys else "")
                             + "; pass the right one with --text-field")


def _read_parquet(path: Path, text_field: str, counts: Counter) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise MobileLLMError(f"cannot read parquet file {path}: {' '.join(str(err).split())}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise MobileLLMError(f"parquet file {path} has no column {text_field!r} (columns: {', '.join(names)}); "
                             f"pass the right one with --text-field")
    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise MobileLLMError(f"parquet column {text_field!r} in {path} has type {column_type}, not string; "
                             f"pass a text column with --text-field")
    batches = pf.iter_batches(batch_size=1024, columns=[text_field])
    while True:
        try:
            column = next(batches).column(0)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise MobileLLMError(f"parquet file {path} is corrupt ({_one_line(err)})") from None
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # arrow does not validate UTF-8 on read
            values = [None if v is None else _decode(v, counts) for v in column.cast(pa.binary()).to_pylist()]
        for text in values:
            if text is None:
                counts["missing_field"] += 1
            else:
                yield from _emit(text, counts)


def read_spec(spec: str, text_field: str = "text", counts: Counter | None = None, txt_mode: str = "file",
              warn: Warn = warn_stderr, allow_truncated: bool = False) -> Iterator[str]:
    """The documents of one input spec: a path, folder, glob or `builtin:<name>`."""
    counts = Counter() if counts is None else counts
    if spec.startswith("builtin:"):
        from mobilellm.data.builtin import builtin_documents

        for text in builtin_documents(spec.split(":", 1)[1]):
            yield from _emit(text, counts)
        return
    for path in resolve_input(spec):
        yield from read_documents(path, text_field, counts, txt_mode, warn, allow_truncated)


def iter_input_documents(specs: Iterable[str], text_field: str = "text", stats: Counter | dict | None = None,
                         max_documents: int | None = None, txt_mode: str = "file",
                         allow_truncated: bool = False) -> Iterator[str]:
    """All documents of several specs in order (for tokenizer training); counts go into `stats`.

    The specs are checked now, so a typo in the last input fails before any work starts.
    """
    specs = list(specs)
    for spec in specs:
        if spec.startswith("builtin:"):
            from mobilellm.data.builtin import BUILTIN_CORPORA

            if spec.split(":", 1)[1] not in BUILTIN_CORPORA:
                raise MobileLLMError(f"unknown built-in corpus {spec!r}; choose from "
                                     + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))
        else:
            resolve_input(spec)
    return _iter_documents(specs, text_field, stats, max_documents, txt_mode, allow_truncated)


def _iter_documents(specs, text_field, stats, max_documents, txt_mode, allow_truncated) -> Iterator[str]:
    counts = Counter()
    n = 0
    try:
        for spec in specs:
            for text in read_spec(spec, text_field, counts, txt_mode, allow_truncated=allow_truncated):
                if max_documents is not None and n >= max_documents:
                    return
                n += 1
                yield text
    finally:
        if stats is not None:
            stats.update(counts)
