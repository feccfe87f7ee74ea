"""`mobilellm prepare`: readers, shards, manifest, determinism, the split, weights and bad input."""

import gzip
import io
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import run_cli, shared_data

from mobilellm.cli import main
from mobilellm.data.builtin import builtin_documents, module_docstrings
from mobilellm.data.loader import PackedTokens
from mobilellm.data.prepare import prepare
from mobilellm.data.readers import read_documents
from mobilellm.errors import MobileLLMError
from mobilellm.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def docs():
    """~60 short English documents (paragraphs of Python's own help text)."""
    paragraphs = [p.strip() for topic in builtin_documents("pydoc")[:20] for p in topic.split("\n\n")]
    return [p for p in paragraphs if len(p) > 80][:60]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(docs, vocab_size=500).save(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write_jsonl(path, records, opener=open):
    with opener(path, "wb") as fh:
        for r in records:
            fh.write((json.dumps(r) + "\n").encode())
    return path


def run(inputs, tok_dir, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 2)
    kw.setdefault("log", lambda line: None)
    return prepare([str(i) for i in inputs], tok_dir, out, **kw)


def split_docs(out, split):
    """The documents of a split as token arrays ([BOS] ... EOS), read straight from the shard files."""
    m = json.loads((out / "manifest.json").read_text())
    eos = m["tokenizer"]["eos_id"]
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])
    ends = np.flatnonzero(stream == eos)
    assert len(stream) == (ends[-1] + 1 if len(ends) else 0)  # the stream ends with a whole document
    return np.split(stream, ends[:-1] + 1) if len(ends) else []


def texts_of(out, tok, split):
    result = []
    for d in split_docs(out, split):
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id
        result.append(tok.decode(d.tolist()))
    return result


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


# ---- round trip, layout, determinism -------------------------------------------------------
def test_round_trip_and_manifest(tmp_path, docs, tok, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    out = tmp_path / "out"
    m = run([src], tok_dir, out, val_fraction=0.2, shard_tokens=1000)
    train, val = texts_of(out, tok, "train"), texts_of(out, tok, "val")
    assert 0 < len(val) < len(docs) // 2
    # Every document lands in exactly one split, in input order within it.
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    # Token ids are the tokenizer's, document by document.
    assert [d.tolist() for d in split_docs(out, "train")] == [tok.encode(t, bos=True, eos=True) for t in train]

    assert m["format"] == "mobilellm-tokens" and m["format_version"] == 1 and m["dtype"] == "uint16"
    assert m["tokenizer"] == {"file": "tokenizer.json", "kind": "bpe", "fingerprint": tok.fingerprint(),
                              "vocab_size": 500, "bos_id": 1, "eos_id": 2, "pad_id": 0, "add_bos": True}
    assert load_tokenizer(out).fingerprint() == tok.fingerprint()  # the tokenizer travels with the data
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 1000 for s in shards[:-1]) and shards[-1]["tokens"] <= 1000
    for s in shards:
        assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert sum(s["documents"] for s in shards) == len(train) == m["splits"]["train"]["documents"]
    assert m["splits"]["train"]["tokens"] == sum(len(d) for d in split_docs(out, "train"))
    (source,) = m["sources"]
    assert source["documents_read"] == len(docs)
    assert source["files"] == [{"path": str(src), "bytes": src.stat().st_size}]
    assert source["documents"] == {"train": len(train), "val": len(val)}
    assert source["tokens"]["train"] == m["splits"]["train"]["tokens"]
    assert m["val_fraction"] == 0.2 and m["seed"] == 0 and m["shard_tokens"] == 1000
    assert not any(m["skipped"].values())
    # The loader reads the same stream.
    data = PackedTokens(out, "train", seq_len=16)
    stream = np.concatenate(split_docs(out, "train"))
    assert len(data) == (len(stream) - 1) // 16
    assert np.array_equal(data[len(data) - 1], stream[(len(data) - 1) * 16:len(data) * 16 + 1])


def test_rerun_is_byte_identical_for_any_worker_count(tmp_path, docs, tok_dir, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr("mobilellm.data.prepare.CHUNK_CHARS", 2000)  # many chunks, several in flight
    outputs = []
    for i, workers in enumerate((1, 2, 3)):
        out = tmp_path / f"out{i}"
        run([src], tok_dir, out, workers=workers, val_fraction=0.1, shard_tokens=700)
        outputs.append(out)
    for out in outputs[1:]:
        assert shard_bytes(out) == shard_bytes(outputs[0])
        assert (out / "manifest.json").read_text() == (outputs[0] / "manifest.json").read_text()
    # Same output directory again: replaced with identical content, nothing left behind.
    run([src], tok_dir, outputs[0], val_fraction=0.1, shard_tokens=700)
    assert shard_bytes(outputs[0]) == shard_bytes(outputs[1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_split_follows_text_and_seed(tmp_path, docs, tok, tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in reversed(docs)])
    run([a], tok_dir, tmp_path / "oa", val_fraction=0.3)
    run([b], tok_dir, tmp_path / "ob", val_fraction=0.3)
    run([a], tok_dir, tmp_path / "oc", val_fraction=0.3, seed=1)
    val_a, val_b = texts_of(tmp_path / "oa", tok, "val"), texts_of(tmp_path / "ob", tok, "val")
    assert sorted(val_a) == sorted(val_b)  # decided by the text, not by position
    assert sorted(texts_of(tmp_path / "oc", tok, "val")) != sorted(val_a)


def test_source_weights(tmp_path, docs, tok, tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:30]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in docs[30:]])
    m = run([f"{a}:2", f"{b}:0.5"], tok_dir, tmp_path / "out", val_fraction=0.2)
    texts = texts_of(tmp_path / "out", tok, "train") + texts_of(tmp_path / "out", tok, "val")
    for d in docs[:30]:
        assert texts.count(d) == 2
    kept_b = [d for d in docs[30:] if d in texts]
    assert 5 <= len(kept_b) <= 25 and all(texts.count(d) == 1 for d in kept_b)
    # Copies share a split: no validation text is also trained on.
    assert not set(texts_of(tmp_path / "out", tok, "val")) & set(texts_of(tmp_path / "out", tok, "train"))
    assert [s["weight"] for s in m["sources"]] == [2.0, 0.5]
    assert sum(m["sources"][0]["documents"].values()) == 60 and m["sources"][0]["documents_read"] == 30
    # Copies are a whole pass apart, not adjacent.
    train = texts_of(tmp_path / "out", tok, "train")
    assert all(x != y for x, y in zip(train, train[1:]))
    m2 = run([f"{a}:2", f"{b}:0.5"], tok_dir, tmp_path / "again", val_fraction=0.2)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "again") and m2 == m
    with pytest.raises(MobileLLMError, match="positive"):
        run([f"{a}:-1"], tok_dir, tmp_path / "bad")


# ---- input formats --------------------------------------------------------------------------
def test_formats_give_the_same_documents(tmp_path, docs, tok, tok_dir):
    d = docs[:10]
    files = {
        "jsonl": write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in d]),
        "gz": write_jsonl(tmp_path / "x.jsonl.gz", [{"text": t} for t in d], opener=gzip.open),
        "json": tmp_path / "x.json",
        "parquet": tmp_path / "x.parquet",
        "zst": tmp_path / "x.jsonl.zst",
    }
    files["json"].write_text(json.dumps([{"text": t} for t in d]))
    pq.write_table(pa.table({"text": d, "n": list(range(10))}), files["parquet"])
    # A frame with a 256 MiB window (zstd --long=28) is over the decoder's default limit: needs max_window_size.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, enable_ldm=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(files["jsonl"].read_bytes())
    files["zst"].write_bytes(buf.getvalue())
    for name, path in files.items():
        assert list(read_documents(path)) == d, name
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, t in enumerate(d):
        (texts / f"{i:02d}.txt").write_text(t)
    assert list(read_documents(texts / "03.txt")) == [d[3]]
    # A folder: recursive, sorted, skipping hidden files and prepared-data folders.
    (texts / ".hidden.txt").write_text("secret")
    run([texts], tok_dir, texts / "prepared", val_fraction=0)
    m = run([texts], tok_dir, tmp_path / "from_dir", val_fraction=0)
    assert texts_of(tmp_path / "from_dir", tok, "train") == d and m["sources"][0]["documents_read"] == 10
    m = run([str(tmp_path / "x.*")], tok_dir, tmp_path / "from_glob", val_fraction=0)
    assert len(m["sources"][0]["files"]) == 5 and texts_of(tmp_path / "from_glob", tok, "train") == d * 5


def test_txt_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\nthree\n\n\nfour\nfive\n")
    assert list(read_documents(path)) == ["one\ntwo\n\nthree\n\n\nfour\nfive\n"]
    assert list(read_documents(path, txt_mode="line")) == ["one", "two", "three", "four", "five"]
    assert list(read_documents(path, txt_mode="paragraph")) == ["one\ntwo", "three", "four\nfive"]


def test_builtin_corpus(tmp_path, tok_dir):
    m = run(["builtin:pydoc"], tok_dir, tmp_path / "out", val_fraction=0.05)
    topics = builtin_documents("pydoc")
    assert m["sources"][0]["documents_read"] == len(topics) > 50
    assert sum(len(t) for t in topics) > 300_000
    assert builtin_documents("pydoc") == topics  # fixed order
    with pytest.raises(MobileLLMError, match="unknown built-in corpus"):
        run(["builtin:nope"], tok_dir, tmp_path / "bad")


def test_stdlib_docstrings_reader(tmp_path):
    (tmp_path / "b.py").write_text('"""Module b."""\n\ndef f():\n    """Does f."""\n\nclass C:\n    """A C."""\n')
    (tmp_path / "a.py").write_text('x = 1\n')  # no docstrings: no document
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "c.py").write_text('"""Module c."""\n')
    (tmp_path / "pkg" / "broken.py").write_text('"""Broken."""\ndef (:\n')  # syntax error: skipped
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Tests are not documentation."""\n')
    assert module_docstrings(tmp_path) == ("Module b.\n\nDoes f.\n\nA C.", "Module c.")


def test_large_vocabulary_uses_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "w5 w69999 w65536"}])
    m = run([src], tmp_path / "tokenizer.json", tmp_path / "out", val_fraction=0)
    assert m["dtype"] == "uint32"
    assert split_docs(tmp_path / "out", "train")[0].tolist() == [7, 70001, 65538, 1]


def test_llama_sentencepiece_documents(tmp_path, docs):
    model = shared_data("tokenizers", "llama2", "tokenizer.model")
    sp = load_tokenizer(model)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:5]])
    m = run([src], model, tmp_path / "out", val_fraction=0)
    assert m["tokenizer"]["kind"] == "sentencepiece" and m["tokenizer"]["add_bos"] and m["dtype"] == "uint16"
    got = [d.tolist() for d in split_docs(tmp_path / "out", "train")]
    assert got == [[1, *sp.encode(d), 2] for d in docs[:5]]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == model.read_bytes()


# ---- bad input ------------------------------------------------------------------------------
def test_skipped_and_repaired_documents_are_counted(tmp_path, tok, tok_dir, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join([
        b'{"text": "a good document about lists"}',
        b"{not json",
        b'{"title": "no text field"}',
        b'{"text": 42}',
        b'{"text": "   "}',
        b'{"text": "bad utf-8 \xff\xfe here"}',
        b'{"text": "lone surrogate \\ud800 here"}',
        b"",
        b'{"text": "a literal </s> is text"}',
    ]) + b"\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02PNG\x00" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    inputs = [src, tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "latin1.txt"]
    lines = []
    m = prepare([str(i) for i in inputs], tok_dir, tmp_path / "out", val_fraction=0, progress=False,
                log=lines.append)
    assert m["skipped"] == {"empty_document": 1, "invalid_json": 1, "missing_field": 2, "empty_file": 1,
                            "binary_file": 1, "damaged_file": 0}
    assert m["utf8_replaced"] == 3
    assert m["sources"][0]["skipped"]["missing_field"] == 2 and m["sources"][3]["utf8_replaced"] == 1
    texts = texts_of(tmp_path / "out", tok, "train")
    assert texts == ["a good document about lists", "bad utf-8 \ufffd\ufffd here",
                     "lone surrogate \ufffd\ufffd\ufffd here", "a literal </s> is text", "caf\ufffd cr\ufffdme"]
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "is empty" in err and "looks binary" in err
    summary = "\n".join(lines)
    assert "JSON lines that do not parse 1" in summary and "invalid UTF-8 replaced" in summary


@pytest.mark.parametrize("name, setup, message", [
    ("missing.jsonl", lambda p: None, "input not found"),
    ("data.csv", lambda p: p.write_text("a,b"), "unsupported input file"),
    ("data.jsonl", lambda p: write_jsonl(p, [{"content": "x"}, {"content": "y"}]),
     r"no record in .* has a string 'text' field \(fields: content\); pass the right one with --text-field"),
    ("t.parquet", lambda p: pq.write_table(pa.table({"body": ["x"]}), p), r"has no column 'text' \(columns: body\)"),
    ("broken.jsonl.zst", lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd garbage garbage"),
     r"broken.jsonl.zst is corrupt: decoding failed by byte 20 \(.*\); 0 documents were read before it"),
    ("empty.jsonl", lambda p: p.write_bytes(b""), "no documents to write"),
])
def test_fatal_input_errors(tmp_path, tok_dir, name, setup, message):
    path = tmp_path / name
    setup(path)
    with pytest.raises(MobileLLMError, match=message):
        run([path], tok_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_keeps_previous_output(tmp_path, docs, tok_dir):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    run([good], tok_dir, out)
    before = shard_bytes(out), (out / "manifest.json").read_text()
    broken = tmp_path / "b.jsonl.gz"
    broken.write_bytes(gzip.compress(good.read_bytes())[:-40])  # truncated mid-way: fails after some shards
    threads = threading.active_count()
    with pytest.raises(MobileLLMError, match="b.jsonl.gz is truncated"):
        run([good, broken], tok_dir, out, shard_tokens=500)
    assert threading.active_count() == threads  # the reader and encoder threads are gone
    assert (shard_bytes(out), (out / "manifest.json").read_text()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _damaged_corpus(path, docs, compress, keep: float = 0.4) -> tuple[int, int]:
    """A compressed JSONL corpus cut to `keep` of its size: (documents in the whole corpus, bytes kept)."""
    words = " ".join(docs).split()
    rng = np.random.default_rng(0)  # text that does not repeat: several zstd blocks (128 KiB each) to cut between
    records = [{"text": " ".join(rng.choice(words, 80))} for _ in range(800)]
    blob = compress("".join(json.dumps(r) + "\n" for r in records).encode())
    cut = int(len(blob) * keep)
    path.write_bytes(blob[:cut])
    return len(records), cut


@pytest.mark.parametrize("suffix, compress", [(".jsonl.zst", zstandard.ZstdCompressor().compress),
                                              (".jsonl.gz", gzip.compress)])
def test_truncated_compressed_input_fails_naming_file_and_offset(tmp_path, docs, tok_dir, suffix, compress, capsys):
    path = tmp_path / f"corpus{suffix}"
    total, cut = _damaged_corpus(path, docs, compress)
    expected = f"{path} is truncated: its {'zstd' if 'zst' in suffix else 'gzip'} stream stops at byte {cut:,}"
    with pytest.raises(MobileLLMError, match="--allow-truncated to keep what was read") as err:
        run([path], tok_dir, tmp_path / "out")
    assert str(err.value).startswith(expected), err.value
    assert not (tmp_path / "out").exists()
    assert main(["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--output",
                 str(tmp_path / "tok"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "tok").exists()

    # opted in: what was read is kept, and said loudly (a warning, and a count in the summary and manifest)
    lines = []
    m = run([path], tok_dir, tmp_path / "out", allow_truncated=True, log=lines.append)
    kept = m["sources"][0]["documents_read"]
    assert m["skipped"]["damaged_file"] == 1 and 0 < kept < total
    assert "truncated or corrupt compressed files (only the documents before the damage kept) 1" in "\n".join(lines)
    assert f"kept the {kept:,} documents read before it (--allow-truncated); the rest of the file is LOST" in (
        capsys.readouterr().err)
    assert main(["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--output",
                 str(tmp_path / "tok"), "--quiet", "--allow-truncated"]) == 0
    assert "damaged_file 1" in capsys.readouterr().out


def test_corrupt_and_multi_frame_zstd(tmp_path, docs, tok_dir):
    records = [{"text": d} for d in docs]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    half = len(data) // 2
    frames = tmp_path / "frames.jsonl.zst"  # what pzstd and `cat a.zst b.zst > c.zst` write: every frame is read
    frames.write_bytes(zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:]))
    assert len(list(read_documents(frames))) == len(records)
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data * 20))
    blob[len(blob) // 2:len(blob) // 2 + 8] = b"\xff" * 8
    broken = tmp_path / "broken.jsonl.zst"
    broken.write_bytes(bytes(blob))
    with pytest.raises(MobileLLMError, match=r"broken.jsonl.zst is corrupt: decoding failed by byte [\d,]+ \("):
        run([broken], tok_dir, tmp_path / "out")


def test_output_and_option_checks(tmp_path, docs, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:3]])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(MobileLLMError, match="not a `mobilellm prepare` output"):
        run([src], tok_dir, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(MobileLLMError, match="not a `mobilellm prepare` output"):
        run([src], tok_dir, tmp_path)
    run([src], tok_dir, tmp_path / "out")
    inside = write_jsonl(tmp_path / "out" / "extra.jsonl", [{"text": "x"}])
    with pytest.raises(MobileLLMError, match="inside the output"):
        run([inside], tok_dir, tmp_path / "out")
    assert inside.exists()
    with pytest.raises(MobileLLMError, match="val fraction"):
        run([src], tok_dir, tmp_path / "o", val_fraction=1.0)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "noeos.json"))
    with pytest.raises(MobileLLMError, match="no EOS"):
        run([src], tmp_path / "noeos.json", tmp_path / "o")


def test_cli_prepare(tmp_path, docs, tok_dir, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in docs[:20]])
    out = tmp_path / "out"
    proc = run_cli("prepare", "--input", src, "--tokenizer", tok_dir, "--output", out, "--text-field", "body",
                   "--val-fraction", "0.2", "--workers", "1", "--shard-tokens", "2000", check=True)
    assert "train" in proc.stdout and "tokens/s" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] > 0
    assert oct((out / "manifest.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    proc = run_cli("prepare", "--input", src, "--tokenizer", tok_dir, "--output", tmp_path / "o2")
    last = proc.stderr.strip().splitlines()[-1]  # after a warning about the first such line
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1
    assert last.startswith("error: no record in") and "(fields: body); pass the right one with --text-field" in last
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--tokenizer", str(tok_dir), "--output",
                 str(tmp_path / "o3")]) == 1
    expected = f"error: input not found: {tmp_path / 'nope'}; pass an existing file, folder or glob\n"
    assert capsys.readouterr().err == expected


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
