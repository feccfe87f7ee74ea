"""--verbose's note on how a layer block sits in the CPU caches, and the run length it is given."""

from mobilellm import sysinfo
from mobilellm.inference.native import longest_run


def test_longest_run_counts_repeats_in_a_row_only():
    assert longest_run([0, 0, 1, 1, 2, 2]) == 2
    assert longest_run([0, 1, 0, 1]) == 1
    assert longest_run([3, 3, 3]) == 3


def test_block_note_names_the_cache_a_repeat_reads(monkeypatch):
    monkeypatch.setattr(sysinfo, "cpu_cache_bytes", lambda: {2: 2**20, 3: 32 * 2**20})
    assert "repeats read from L2" in sysinfo.block_cache_note(int(1.5 * 2**20), threads=2, repeats=2)
    assert "repeats read from L3" in sysinfo.block_cache_note(3 * 2**20, threads=2, repeats=2)
    assert "fits no cache" in sysinfo.block_cache_note(40 * 2**20, threads=2, repeats=2)
    note = sysinfo.block_cache_note(3 * 2**20, threads=2, repeats=1)
    assert "1.50 MiB per thread" in note and "repeats" not in note


def test_cache_sizes_read_from_this_machine():
    sizes = sysinfo.cpu_cache_bytes()
    assert all(level in (1, 2, 3, 4) and size > 0 for level, size in sizes.items())
