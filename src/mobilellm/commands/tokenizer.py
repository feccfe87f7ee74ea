"""`mobilellm tokenizer train | encode`: train a byte-level BPE on text files, or inspect a tokenizer."""

from __future__ import annotations

from pathlib import Path

from mobilellm.errors import MobileLLMError
from mobilellm.tokenizer import TOKENIZER_FILES, DEFAULT_BOS, DEFAULT_EOS, DEFAULT_PAD, DEFAULT_ROLES, load_tokenizer, train_tokenizer


def check_tokenizer_output(output: Path) -> None:
    """A new tokenizer goes into a new or empty directory, or over an earlier tokenizer; never into a
    model directory or prepared data, whose weights or tokens were made with the tokenizer there."""
    if output.exists() and not output.is_dir():
        raise MobileLLMError(f"output {output} is a file; pass a directory for the tokenizer")
    if not output.is_dir():
        return
    for marker, what in (("config.json", "a model directory"), ("manifest.json", "prepared data")):
        if (output / marker).is_file():
            raise MobileLLMError(f"output {output} is {what} ({marker}); its tokenizer must stay the one it was made "
                                 f"with, so it is not replaced: choose a new directory")
    others = sorted(p.name for p in output.iterdir() if p.name not in TOKENIZER_FILES and not p.name.startswith("."))
    if others:
        raise MobileLLMError(f"output {output} holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); refusing to write a tokenizer among them: "
                             f"choose a new or empty directory")


def _run_train(args) -> int:
    from mobilellm.data.readers import iter_input_documents

    check_tokenizer_output(Path(args.output))
    roles = [r for r in args.roles.split(",") if r] if args.roles else []
    counts: dict[str, int] = {}
    texts = iter_input_documents(args.input, text_field=args.text_field, stats=counts, max_documents=args.max_documents,
                                 allow_truncated=args.allow_truncated)
    tok = train_tokenizer(texts, args.vocab_size, bos=args.bos or None, eos=args.eos or None, pad=args.pad or None,
                          roles=roles, add_bos=not args.no_add_bos, min_frequency=args.min_frequency,
                          show_progress=not args.quiet)
    tok.save(args.output)
    print(f"trained on {counts.get('documents', 0)} documents -> {Path(args.output) / tok.file_name}")
    skipped = {k: v for k, v in counts.items() if k != "documents" and v}
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus supported only {tok.vocab_size} of the {args.vocab_size} requested tokens; "
              f"train on more text for a larger vocabulary")
    print(tok.describe())
    return 0


def _run_encode(args) -> int:
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, bos=args.bos, eos=args.eos)
    print(" ".join(map(str, ids)))
    print(" ".join(repr(tok.id_to_token(i)) for i in ids))
    print(f"{len(ids)} tokens; decoded: {tok.decode(ids, skip_special=False)!r}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="<action>", required=True)

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer (tokenizer.json) on text files")
    t.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="file, folder or glob of .txt/.jsonl/.json/.parquet (optionally .gz/.zst), or builtin:pydoc; "
                        "repeatable")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    t.add_argument("--output", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    t.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    t.add_argument("--bos", default=DEFAULT_BOS, help=f"BOS token (default: {DEFAULT_BOS}; '' for none)")
    t.add_argument("--eos", default=DEFAULT_EOS, help=f"EOS token (default: {DEFAULT_EOS})")
    t.add_argument("--pad", default=DEFAULT_PAD, help=f"PAD token (default: {DEFAULT_PAD}; '' for none)")
    t.add_argument("--roles", default=",".join(DEFAULT_ROLES),
                   help="comma-separated chat roles, each gets a <|role|> token (default: system,user,assistant)")
    t.add_argument("--no-add-bos", action="store_true", help="do not start documents with BOS")
    t.add_argument("--allow-truncated", action="store_true",
                   help="keep the documents read before the point where a .gz/.zst input is truncated or corrupt "
                        "(default: that is an error)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_run_train)

    e = tsub.add_parser("encode", help="show the ids and tokens of a text")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json / tokenizer.model or a directory holding one")
    e.add_argument("text")
    e.add_argument("--bos", action="store_true", help="prepend BOS")
    e.add_argument("--eos", action="store_true", help="append EOS")
    e.set_defaults(func=_run_encode)
