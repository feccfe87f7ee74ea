"""`mobilellm bench`: each runtime in its own subprocess, same greedy tokens, sane numbers."""

import json

import pytest
import torch

from conftest import run_cli
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.model import MobileLLM


def test_bench_pytorch_and_onnx_agree_on_tokens(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from mobilellm.export.onnx import export_onnx

    torch.manual_seed(0)
    model = MobileLLM(get_preset("mobilellm-tiny", n_layers=2, bos_token_id=None, eos_token_id=None)).eval()
    save_model_dir(model, tmp_path / "m")
    export_onnx(model, tmp_path / "m.onnx")
    proc = run_cli("bench", tmp_path / "m", tmp_path / "m.onnx", "--threads", "1", "--prompt-tokens", "16",
                   "--new-tokens", "8", "--json", tmp_path / "r.json", check=True)
    assert "pytorch" in proc.stdout and "onnxruntime" in proc.stdout and "decode ms/token" in proc.stdout
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["runtime"] for r in rows] == ["pytorch", "onnxruntime"]
    assert rows[0]["output_ids"] == rows[1]["output_ids"] and len(rows[0]["output_ids"]) == 8
    for r in rows:
        assert r["load_ms"] > 0 and r["first_token_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["peak_rss_mib"] >= r["rss_before_load_mib"] > 0 and r["file_mib"] > 0


def test_bench_bad_inputs(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    for target, needle in [(tmp_path / "missing.pte", "does not exist"), (tmp_path / "x.bin", "unknown artifact")]:
        proc = run_cli("bench", target)
        assert proc.returncode != 0 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
