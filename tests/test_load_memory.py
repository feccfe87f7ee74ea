"""Loading a model directory for generation holds one copy of the weights: entries memory-mapped,
converted block by block (checkpoint._read_safetensors, NativeBackend); the results are unchanged."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest

from mobilellm.checkpoint import load_model_dir, save_model_dir
from mobilellm.config import get_preset
from mobilellm.inference import Engine, load_engine
from mobilellm.model import MobileLLM

IDS = [3, 17, 250, 9, 101, 42, 7, 300]


def require_native():
    from mobilellm.inference.native import NativeUnavailable, library

    try:
        library()
    except NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")


one_thread = pytest.fixture(scope="module", autouse=True)(conftest.one_thread)


def saved(root: Path, seed: int = 0, **overrides) -> tuple[MobileLLM, Path]:
    torch.manual_seed(seed)
    # ffn 192: every width a multiple of 32, so int4 runs too
    model = MobileLLM(get_preset("mobilellm-tiny", ffn_dim=192, **overrides)).eval()
    return model, save_model_dir(model, root)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("backend,precision", [("native", "fp32"), ("native", "int8"), ("native", "int4"),
                                               ("native", "bf16"), ("torch", "fp32")])
def test_mapped_load_gives_the_logits_of_the_model_in_memory(tmp_path, tied, backend, precision):
    """The engine over a directory (mapped, consumed block by block) equals one built from the same
    model held whole in memory, exactly."""
    if backend == "native":
        require_native()
    model, directory = saved(tmp_path / "m", tie_embeddings=tied)
    reference = Engine(model, precision=precision, backend=backend, max_len=32)
    loaded = load_engine(directory, need_tokenizer=False, precision=precision, backend=backend, max_len=32)
    assert loaded.weight_bytes() == reference.weight_bytes()
    with torch.inference_mode():
        assert torch.equal(loaded.backend.prefill(0, IDS), reference.backend.prefill(0, IDS))
        assert torch.equal(loaded.backend.decode([0], [5]), reference.backend.decode([0], [5]))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_engine_keeps_no_mapping_of_the_weights_file(tmp_path):
    """A loaded model views its file's pages; the engine that consumed it holds none of them."""
    require_native()
    _, directory = saved(tmp_path / "m")
    weights = str((directory / "model.safetensors").resolve())

    def mapped() -> int:
        return sum(weights in line for line in Path("/proc/self/maps").read_text().splitlines())

    model = load_model_dir(directory)
    assert mapped() > 0
    assert torch.equal(model.embed_tokens.weight, saved(tmp_path / "again")[0].embed_tokens.weight)
    del model
    engine = load_engine(directory, need_tokenizer=False, backend="native", max_len=32)
    assert mapped() == 0
    assert engine.weight_bytes() > 0


PEAK_SCRIPT = r"""
import ctypes, json, sys
import torch
from mobilellm.inference import load_engine
from mobilellm.inference.native import library
library()
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
ctypes.CDLL(None).malloc_trim(0)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # "5": the peak (VmHWM) starts again from now
    fh.write("5")
engine = load_engine(sys.argv[1], need_tokenizer=False, backend="native", precision=sys.argv[2], max_len=16)
print(json.dumps({"peak": status("VmHWM") - base, "weights": engine.weight_bytes(), "cache": engine.cache_bytes()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_loading_a_mid_size_model_adds_little_beyond_its_weights(tmp_path, precision):
    """In a fresh process: what loading adds to the resident set at its peak is the weights as held
    plus a small margin (the old loader held the file's weights and their converted copy: ~2x fp32)."""
    require_native()
    torch.manual_seed(0)
    cfg = get_preset("mobilellm-tiny", vocab_size=16384, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024)
    directory = save_model_dir(MobileLLM(cfg), tmp_path / "mid")  # 19M parameters, 76 MB in fp32
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(directory), precision], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # the margin: the largest source matrix (the fp32 embedding, 24 MiB) mapped beside its copies reads
    # 74-82 MiB at int8 from run to run; the old loader held +199 MiB (fp32) and +206 MiB (int8)
    limit = 1.15 * r["weights"] + r["cache"] + 64 * 2**20
    assert r["peak"] <= limit, f"loading peaked at {r['peak'] / 2**20:.0f} MiB over the start, limit {limit / 2**20:.0f}"
