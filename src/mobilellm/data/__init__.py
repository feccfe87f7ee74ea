"""Data: readers (text, JSON lines, parquet; gz/zst), `prepare` (text -> token shards + manifest.json),
the packed training loader, and a built-in corpus for the quickstart.

Submodules are imported on use: `prepare` must not pull in torch, the loader needs it.
"""
