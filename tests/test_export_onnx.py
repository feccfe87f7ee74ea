"""ONNX export: the graph runs in onnxruntime with a KV cache and matches PyTorch."""

import copy
import re

import numpy as np
import pytest
import torch

from conftest import greedy_tokens, run_cli
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.model import MobileLLM
from mobilellm.quantize import quantize_model

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from mobilellm.export.onnx import OnnxRunner, export_onnx  # noqa: E402


def tiny(preset="mobilellm-tiny", **changes):
    return MobileLLM(get_preset(preset, **{"n_layers": 2, "ffn_dim": 192, **changes})).eval()




def onnx_greedy(runner, prompt, n):
    runner.reset()
    out = [int(runner.forward(prompt)[-1].argmax())]
    for _ in range(n - 1):
        out.append(int(runner.forward([out[-1]])[-1].argmax()))
    return out


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
def test_onnx_with_kv_cache_matches_pytorch(tmp_path, preset):
    torch.manual_seed(0)
    model = tiny(preset)
    info = export_onnx(copy.deepcopy(model), tmp_path / "m.onnx")
    assert info["logical_layers"] == model.config.n_logical_layers
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "input_ids" and len(names) == 1 + 2 * model.config.n_logical_layers
    # batch 3, prompt of 7 from an empty cache, then a 2-token chunk on top of it
    tokens = torch.randint(0, 512, (3, 9))
    past = {n: np.zeros((3, 2, 0, 16), np.float32) for n in names[1:]}
    out = session.run(None, {"input_ids": tokens[:, :7].numpy(), **past})
    past = {n: v for n, v in zip(names[1:], out[1:])}
    out2 = session.run(None, {"input_ids": tokens[:, 7:].numpy(), **past})
    with torch.no_grad():
        ref = model(tokens).numpy()
    assert np.abs(out[0] - ref[:, :7]).max() <= 1e-3
    assert np.abs(out2[0] - ref[:, 7:]).max() <= 1e-3
    assert out2[1].shape == (3, 2, 9, 16)
    prompt = tokens[0, :8].tolist()
    assert onnx_greedy(OnnxRunner(tmp_path / "m.onnx"), prompt, 32) == greedy_tokens(model, prompt, 32)


def test_layer_shared_onnx_stores_each_block_once(tmp_path):
    torch.manual_seed(1)
    import onnx

    def weight_bytes(path):
        return sum(len(t.raw_data) or t.ByteSize() for t in onnx.load(str(path)).graph.initializer)

    export_onnx(tiny("mobilellm-tiny-ls"), tmp_path / "ls.onnx")  # 2 blocks, 4 logical layers
    export_onnx(tiny(), tmp_path / "base.onnx")  # the same 2 blocks, run once each
    export_onnx(tiny(n_layers=4), tmp_path / "deep.onnx")  # 4 distinct blocks
    ls, base, deep = (weight_bytes(tmp_path / f"{n}.onnx") for n in ("ls", "base", "deep"))
    assert ls < base * 1.02 < deep


def test_onnx_cli_and_bad_inputs(tmp_path):
    model = tiny()
    save_model_dir(model, tmp_path / "f")
    save_model_dir(quantize_model(copy.deepcopy(model), "w8a8"), tmp_path / "q")
    proc = run_cli("export", tmp_path / "f", "--format", "onnx", "--output", tmp_path / "m.onnx", check=True)
    assert "onnx" in proc.stdout and (tmp_path / "m.onnx").exists()
    # one progress line per stage, each with the time elapsed so far, in order; no third-party noise
    stages = re.findall(r"^\[ *([0-9.]+) s\] (\w+):", proc.stdout, flags=re.M)
    assert [name for _, name in stages] == ["load", "trace", "serialize", "done"], proc.stdout
    assert [float(t) for t, _ in stages] == sorted(float(t) for t, _ in stages)
    assert "Warning" not in proc.stdout + proc.stderr and "rename_mapping" not in proc.stderr, proc.stderr
    for args, needle in [
        ((tmp_path / "f", "--precision", "q8_0"), "not available for onnx"),
        ((tmp_path / "q",), "dynamic int8 activations"),
        ((tmp_path / "nope",), "does not exist"),
    ]:
        proc = run_cli("export", *args, "--format", "onnx", "--output", tmp_path / "bad.onnx")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert not (tmp_path / "bad.onnx").exists()
    before = (tmp_path / "m.onnx").read_bytes()
    proc = run_cli("export", tmp_path / "q", "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert proc.returncode != 0 and (tmp_path / "m.onnx").read_bytes() == before  # earlier output survives
