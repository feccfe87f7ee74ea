"""What this machine has and what this process uses: memory, the CPU or GPU name."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

from mobilellm.errors import MobileLLMError


def proc_line(path: str, prefix: str | tuple[str, ...]) -> str | None:
    """The first line of a /proc file that starts with `prefix`; None where there is none (or no /proc)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. VmHWM restarts at exec, where ru_maxrss would carry
    over the parent's size from fork (Linux); elsewhere ru_maxrss."""
    line = proc_line("/proc/self/status", "VmHWM:")
    if line is not None:
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def available_memory_bytes() -> int | None:
    """Memory the kernel could give this process now (MemAvailable), or None where unknown."""
    line = proc_line("/proc/meminfo", "MemAvailable:")
    return None if line is None else int(line.split()[1]) * 1024


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps freed pages otherwise, e.g. ~200 MiB after
    converting a 125M model to int8)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def hardware() -> str:
    """The GPUs, or the CPU model and core count: recorded beside every measurement."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    line = proc_line("/proc/cpuinfo", "model name")
    cpu = line.split(":", 1)[1].strip() if line else platform.processor() or "CPU"
    return f"{cpu}, {os.cpu_count()} cores"


def resolve_device(name: str):
    """cpu, cuda, cuda:N or auto -> a torch.device that exists here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MobileLLMError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MobileLLMError("--device cuda given but no CUDA GPU is visible; use --device cpu")
    return device


def cpu_cache_bytes() -> dict[int, int]:
    """Data/unified cache size per level as one core sees it ({2: L2 bytes, 3: L3 bytes}, Linux
    sysfs; {} where unknown). An L3 shared by several cores is reported whole."""
    sizes: dict[int, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        try:
            sizes[level] = int(size.rstrip("KMG")) * unit
        except ValueError:
            continue
    return sizes


def block_cache_note(block_bytes: int, threads: int, repeats: int) -> str:
    """Whether a layer block's slice per thread fits this CPU's caches: with immediate layer sharing
    each thread computes the same rows in every repeat, so a repeat reads its slice from the cache
    it fits in instead of memory."""
    per_thread = block_bytes / max(threads, 1)
    caches = cpu_cache_bytes()
    parts = [f"block {block_bytes / 2**20:.2f} MiB, {per_thread / 2**20:.2f} MiB per thread ({threads} threads)"]
    for level in (2, 3):
        if level in caches:
            parts.append(f"L{level} {caches[level] / 2**20:.2f} MiB")
    if repeats > 1:
        fits = next((f"L{level}" for level in (2, 3) if level in caches and
                     per_thread * (threads if level == 3 else 1) <= caches[level]), None)
        parts.append(f"each block runs {repeats}x in a row: repeats read from "
                     + (fits if fits else "memory (the slice fits no cache)" if caches else "an unknown cache"))
    return "; ".join(parts)
