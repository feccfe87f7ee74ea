"""The `mobilellm` command line: one module per command, each with `register(subparsers)` and `run(args)`.
Only this package parses arguments; the library modules it calls take plain values."""
