import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when that data is not beside the repo."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repository)")
    return path


def run_cli(*args: str, check: bool = False, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `mobilellm ...` as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    proc = subprocess.run([sys.executable, "-m", "mobilellm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"mobilellm {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def open_llama(path, n_ctx: int = 128):
    """llama.cpp on a GGUF file, every position's logits kept; f32 KV cache: f16 alone moves logits ~0.1."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, type_k=0, type_v=0,
                           verbose=False)


def llama_logits(llm, tokens: list[int]):
    """llama.cpp's logits at every position of `tokens`, from an empty cache."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)])


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` in llama.cpp (compare with greedy_tokens)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` with the model's own KV cache: the reference runtimes match."""
    from mobilellm.model import KVCache

    cache = KVCache(model.config, 1, len(prompt) + n)
    tokens, start, out = torch.tensor([prompt]), 0, []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(tokens, cache=cache, start=start)[0, -1].argmax())
            start += tokens.shape[1]
            tokens = torch.tensor([[nxt]])
            out.append(nxt)
    return out


def one_thread():
    """Torch (and the native kernels) on one thread for a test module: tiny models gain nothing from
    threads, and spinning OpenMP workers crawl on a busy shared CPU. Test modules make it a fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
