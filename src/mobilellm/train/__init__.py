"""Pretraining engine: one loop for a CPU, one GPU and many GPUs under torchrun (DDP or FSDP2)."""
