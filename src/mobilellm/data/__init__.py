"""Data: readers, `prepare` (text -> token shards + manifest.json), the training loader, built-in corpora.

Submodules are imported on use: `prepare` must not pull in torch, the loader needs it."""
