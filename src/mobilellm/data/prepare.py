"""`mobilellm prepare`: documents -> flat train/val token shards + manifest.json.

Every document becomes `[BOS] tokens EOS`, concatenated and cut into shards of `shard_tokens` tokens
(raw little-endian uint16, or uint32 for vocabularies over 65536). The output depends only on the
inputs, the tokenizer and the options (re-running gives byte-identical files), and it is built in a
temporary directory swapped in at the end. docs/data.md describes the layout and guarantees."""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from mobilellm import __version__
from mobilellm.data import readers
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_dir, write_json_atomic
from mobilellm.tokenizer import Tokenizer, load_tokenizer

FORMAT = "mobilellm-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB shards at uint16
# Text per tokenizer call: many documents per call for the thread pool, bounded memory
# (a call's intermediate token objects take ~25 bytes per character of text).
CHUNK_CHARS = 4 << 20


@dataclass
class Source:
    """One `--input`: its documents, resampled by `weight` (2.5 = every document twice, half of them thrice)."""

    spec: str
    weight: float = 1.0
    files: list[Path] = field(default_factory=list)  # empty for builtin corpora


def parse_source(spec: str) -> Source:
    """`PATH`, `GLOB`, `builtin:NAME`, each optionally followed by `:WEIGHT` (a positive number)."""
    head, sep, tail = spec.rpartition(":")
    weight = 1.0
    if sep and head:
        try:
            weight = float(tail)
            spec = head
        except ValueError:
            pass  # the colon belongs to the name (builtin:pydoc, C:\data)
    if not (weight > 0 and math.isfinite(weight)):
        raise MobileLLMError(f"source weight must be a positive number, got {tail!r} in {spec}:{tail}")
    files = [] if spec.startswith("builtin:") else readers.resolve_input(spec)
    return Source(spec, weight, files)


def _unit(data: bytes, key: bytes, purpose: bytes) -> float:
    """A uniform number in [0, 1) from a keyed hash of the document: same text, same seed, same answer."""
    digest = hashlib.blake2b(data, digest_size=8, key=key, person=purpose).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass
class _Chunk:
    source: int
    texts: list[str]
    is_val: list[bool]


def _chunks(sources: list[Source], text_field: str, txt_mode: str, val_fraction: float, seed: int,
            counts: list[Counter], allow_truncated: bool = False) -> Iterator[_Chunk]:
    key = f"mobilellm-prepare:{seed}".encode()
    for index, source in enumerate(sources):
        for p in range(math.ceil(source.weight)):
            keep = min(1.0, source.weight - p)  # probability that a document gets its (p+1)-th copy
            purpose = f"copy{p}".encode()
            # Later passes re-read the source; only the first one counts documents and skips.
            stats = counts[index] if p == 0 else Counter()
            chunk, size = _Chunk(index, [], []), 0
            warn = readers.warn_stderr if p == 0 else _quiet  # warn about a file once, not once per pass
            for text in readers.read_spec(source.spec, text_field, stats, txt_mode, warn=warn,
                                          allow_truncated=allow_truncated):
                data = text.encode("utf-8") if keep < 1.0 or val_fraction > 0 else b""
                if keep < 1.0 and _unit(data, key, purpose) >= keep:
                    continue
                # Copies of a document share its split: the split hash does not depend on the pass.
                chunk.texts.append(text)
                chunk.is_val.append(val_fraction > 0 and _unit(data, key, b"split") < val_fraction)
                size += len(text)
                if size >= CHUNK_CHARS:
                    yield chunk
                    chunk, size = _Chunk(index, [], []), 0
            if chunk.texts:
                yield chunk


def _quiet(message: str) -> None:
    pass


# ---- tokenization: the backend's own threads, pipelined ------------------------------------------
def configure_threads(workers: int) -> None:
    """Size the `tokenizers` thread pool for this process (RAYON_NUM_THREADS).

    The pool is built once, at the first parallel call, so this only works before any tokenizer has
    run in the process; the CLI calls it first thing. sentencepiece takes its count per call.
    """
    os.environ["RAYON_NUM_THREADS"] = str(workers)


def _encode_chunk(texts: list[str], tok: Tokenizer, dtype: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (all documents' tokens as one array, tokens per document), each document [BOS] ids EOS."""
    # parse_special=False: a literal "</s>" in a document is text, not a document boundary.
    if workers == 1 and tok.kind == "bpe":  # one document per call: one pool thread at a time
        ids = [tok.encode_arrays([t], parse_special=False)[0] for t in texts]
    else:
        ids = tok.encode_arrays(texts, parse_special=False)
    n_text = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    lengths = n_text + 1 + int(tok.add_bos)
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]), dtype=dtype)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[ends - 1] = False
    tokens[ends - 1] = tok.eos_id
    if tok.add_bos:
        is_text[ends - lengths] = False
        tokens[ends - lengths] = tok.bos_id
    if len(ids):
        tokens[is_text] = np.concatenate(ids)
    return tokens, lengths


def _encode_all(chunks: Iterator[_Chunk], tok: Tokenizer, dtype: str,
                workers: int) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
    """Tokenize chunks in input order with two calls in flight.

    The backends release the GIL, so a reader thread parses the next chunks, the second call keeps the
    tokenizer's threads busy while the first call's longest documents finish, and the caller writes
    meanwhile. Results are taken in submission order, so threads never change the output.
    """
    threads, tok.threads = tok.threads, workers  # sentencepiece's per-call thread count
    in_flight = 1 if workers == 1 else 2
    pending: deque = deque()
    with ThreadPoolExecutor(in_flight, thread_name_prefix="prepare-encode") as pool:
        try:
            for chunk in _prefetch(chunks):
                pending.append((chunk, pool.submit(_encode_chunk, chunk.texts, tok, dtype, workers)))
                if len(pending) > in_flight:
                    done, future = pending.popleft()
                    yield (done, *future.result())
            while pending:
                done, future = pending.popleft()
                yield (done, *future.result())
        finally:
            for _, future in pending:
                future.cancel()
            tok.threads = threads


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a background thread, up to `depth` ahead (reading overlaps tokenizing)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _ShardWriter:
    """Appends documents to `<split>-NNNNN.bin` files of exactly `shard_tokens` tokens (the last one fewer)."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self._fh = None
        self._hash = None
        self._tokens = self._docs = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        pos = 0
        while pos < len(tokens):
            if self._fh is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._tokens)
            data = tokens[pos:pos + take].astype(self.dtype, copy=False).tobytes()
            self._fh.write(data)
            self._hash.update(data)
            # A document belongs to the shard where it starts.
            self._docs += int(np.count_nonzero((starts >= pos) & (starts < pos + take)))
            self._tokens += take
            pos += take
            if self._tokens == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.directory / name, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()
        self._tokens = self._docs = 0
        self.shards.append({"file": name})

    def _close(self) -> None:
        self._fh.close()
        self._fh = None
        self.shards[-1].update(tokens=self._tokens, documents=self._docs, sha256=self._hash.hexdigest())

    def finish(self) -> dict:
        if self._fh is not None:
            self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _check_output(output: Path, sources: list[Source]) -> None:
    if output.exists() and not output.is_dir():
        raise MobileLLMError(f"output {output} is a file; pass a directory for the shards")
    if output.is_dir() and any(output.iterdir()):
        manifest = output / "manifest.json"
        if not manifest.is_file() or f'"{FORMAT}"' not in manifest.read_text(encoding="utf-8", errors="replace"):
            raise MobileLLMError(f"output {output} exists and is not a `mobilellm prepare` output; refusing to "
                                 f"replace it: choose a new directory or delete it")
    resolved = output.resolve()
    for source in sources:
        for f in source.files:
            if resolved in f.resolve().parents:
                raise MobileLLMError(f"input {f} lies inside the output {output}, which prepare replaces; "
                                     f"choose an output directory outside the inputs")


def prepare(inputs: Sequence[str], tokenizer: str | os.PathLike | Tokenizer, output: str | os.PathLike, *,
            text_field: str = "text", val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, txt_mode: str = "file",
            progress: bool = True, log: Callable[[str], None] = print, allow_truncated: bool = False) -> dict:
    """Tokenize `inputs` (specs as for `parse_source`) into `output`; returns the manifest.

    `workers`: tokenizer threads (None or 0: one per core). sentencepiece honours it exactly;
    `tokenizers` uses one thread for workers=1, else its process-wide pool (see `configure_threads`).
    """
    if not inputs:
        raise MobileLLMError("no inputs; pass at least one --input")
    if not 0.0 <= val_fraction < 1.0:
        raise MobileLLMError(f"val fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise MobileLLMError(f"shard size must be a positive number of tokens, got {shard_tokens}")
    if txt_mode not in readers.TXT_MODES:
        raise MobileLLMError(f"unknown text mode {txt_mode!r}; choose from {', '.join(readers.TXT_MODES)}")
    sources = [parse_source(spec) for spec in inputs]
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise MobileLLMError("the tokenizer has no EOS token, which separates documents; use a tokenizer with one")
    output = Path(output)
    _check_output(output, sources)
    workers = workers or default_workers()
    if workers < 0:
        raise MobileLLMError(f"workers must be >= 0 (0: one per core), got {workers}")
    dtype = token_dtype(tok.vocab_size)
    counts = [Counter() for _ in sources]
    per_source = [{split: Counter() for split in SPLITS} for _ in sources]

    from tqdm import tqdm

    start = time.perf_counter()
    with atomic_dir(output) as tmp:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        # disable=None: a bar on terminals only, not in logs and pipes.
        bar = tqdm(unit="doc", disable=None if progress else True, desc="prepare", smoothing=0.1)
        total_tokens = 0
        try:
            chunks = _chunks(sources, text_field, txt_mode, val_fraction, seed, counts, allow_truncated)
            for chunk, tokens, lengths in _encode_all(chunks, tok, dtype, workers):
                is_val = np.asarray(chunk.is_val, dtype=bool)
                token_is_val = np.repeat(is_val, lengths)
                for split, doc_mask, tok_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
                    if doc_mask.any():
                        writers[split].write(tokens[tok_mask], lengths[doc_mask])
                        per_source[chunk.source][split].update(documents=int(doc_mask.sum()),
                                                               tokens=int(lengths[doc_mask].sum()))
                total_tokens += len(tokens)
                bar.update(len(lengths))
                bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            bar.close()
        splits = {split: w.finish() for split, w in writers.items()}
        if splits["train"]["documents"] + splits["val"]["documents"] == 0:
            skipped = _sum_skips(counts)
            why = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "the inputs hold no text"
            raise MobileLLMError(f"no documents to write ({why}); check the inputs and --text-field")
        tok.save(tmp)  # the tokenizer travels with its data
        manifest = _manifest(tok, dtype, sources, counts, per_source, splits, text_field=text_field,
                             txt_mode=txt_mode, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens)
        write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence means the shards are complete
    elapsed = time.perf_counter() - start
    for line in summary(manifest, output, elapsed):
        log(line)
    return manifest


def _sum_skips(counts: list[Counter]) -> dict[str, int]:
    return {reason: sum(c[reason] for c in counts) for reason in readers.SKIP_REASONS}


def _manifest(tok: Tokenizer, dtype: str, sources: list[Source], counts: list[Counter], per_source: list[dict],
              splits: dict, **options) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"mobilellm {__version__}",
        "tokenizer": {
            "file": tok.file_name,
            "kind": tok.kind,
            "fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "add_bos": tok.add_bos,
        },
        "dtype": dtype,
        "layout": ("[BOS] document EOS" if tok.add_bos else "document EOS") + ", concatenated",
        **options,
        "splits": splits,
        "sources": [
            {
                "input": s.spec,
                "weight": s.weight,
                "files": [{"path": str(f), "bytes": f.stat().st_size} for f in s.files],
                "documents_read": c["documents"],
                "documents": {split: per_source[i][split]["documents"] for split in SPLITS},
                "tokens": {split: per_source[i][split]["tokens"] for split in SPLITS},
                "skipped": {reason: c[reason] for reason in readers.SKIP_REASONS},
                readers.UTF8_REPLACED: c[readers.UTF8_REPLACED],
            }
            for i, (s, c) in enumerate(zip(sources, counts))
        ],
        "skipped": _sum_skips(counts),
        readers.UTF8_REPLACED: sum(c[readers.UTF8_REPLACED] for c in counts),
    }


def summary(manifest: dict, output: Path, elapsed: float) -> list[str]:
    splits = manifest["splits"]
    total = sum(s["tokens"] for s in splits.values())
    lines = [f"wrote {output}: {total:,} tokens ({manifest['dtype']}) in {elapsed:.1f} s "
             f"({total / max(elapsed, 1e-9):,.0f} tokens/s)"]
    for name, split in splits.items():
        lines.append(f"  {name:<5} {split['tokens']:>14,} tokens {split['documents']:>10,} documents "
                     f"{len(split['shards']):>4} shard(s)")
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append("  skipped: " + (", ".join(f"{readers.SKIP_REASONS[k]} {v}" for k, v in skipped.items())
                                 if skipped else "nothing"))
    if manifest["val_fraction"] > 0 and not splits["val"]["documents"]:
        lines.append("  note: no document fell into the validation split; raise --val-fraction for a validation set")
    if manifest[readers.UTF8_REPLACED]:
        lines.append(f"  invalid UTF-8 replaced with U+FFFD in {manifest[readers.UTF8_REPLACED]} document(s)")
    return lines
