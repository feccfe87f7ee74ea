"""ExecuTorch export: the .pte runs in ExecuTorch's own Python runtime and matches PyTorch.

Lowering costs seconds per executed decoder layer, so every model here has 1-2 physical blocks.
"""

import copy

import pytest
import torch

from conftest import greedy_tokens, run_cli
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.model import MobileLLM
from mobilellm.quantize import quantize_model

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from mobilellm.export.executorch import PteRunner, export_pte  # noqa: E402

MAX_LEN = 64


def tiny(preset="mobilellm-tiny", n_layers=2, **overrides):
    return MobileLLM(get_preset(preset, n_layers=n_layers, ffn_dim=192, bos_token_id=None, eos_token_id=None,
                                **overrides)).eval()




def pte_greedy(runner, prompt: list[int], n: int) -> list[int]:
    out, nxt, pos = [], int(runner.forward(prompt, 0)[-1].argmax()), len(prompt)
    out.append(nxt)
    for _ in range(n - 1):
        nxt = int(runner.forward([nxt], pos)[-1].argmax())
        out.append(nxt)
        pos += 1
    return out


@pytest.fixture(scope="module")
def fp32_pte(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny()
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    info = export_pte(copy.deepcopy(model), path, max_len=MAX_LEN)
    return model, path, info


def test_fp32_pte_matches_pytorch_logits_and_greedy_tokens(fp32_pte):
    model, path, info = fp32_pte
    assert info["logical_layers"] == 2 and info["max_len"] == MAX_LEN
    runner = PteRunner(path)
    prompt = torch.randint(0, 512, (1, 11))
    with torch.no_grad():
        ref = model(prompt)[0]
    got = runner.forward(prompt[0].tolist(), 0)  # dynamic-length prefill
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-3
    runner = PteRunner(path)  # fresh program state
    assert pte_greedy(runner, prompt[0].tolist()[:8], 32) == greedy_tokens(model, prompt[0].tolist()[:8], 32)


def test_layer_shared_pte_stores_each_block_once(tmp_path, fp32_pte):
    torch.manual_seed(1)
    shared = tiny("mobilellm-tiny-ls", n_layers=1)  # one block run twice = 2 logical layers
    base = tiny("mobilellm-tiny", n_layers=1)
    export_pte(copy.deepcopy(shared), tmp_path / "ls.pte", max_len=MAX_LEN)
    export_pte(copy.deepcopy(base), tmp_path / "base.pte", max_len=MAX_LEN)
    ls_size, base_size = (tmp_path / "ls.pte").stat().st_size, (tmp_path / "base.pte").stat().st_size
    two_block_size = fp32_pte[1].stat().st_size  # what a copied block would cost
    assert ls_size < base_size * 1.1 < two_block_size, (ls_size, base_size, two_block_size)
    prompt = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        ref = shared(prompt)[0]
    assert (PteRunner(tmp_path / "ls.pte").forward(prompt[0].tolist(), 0) - ref).abs().max() <= 1e-3
    tokens = prompt[0].tolist()
    assert pte_greedy(PteRunner(tmp_path / "ls.pte"), tokens, 32) == greedy_tokens(shared, tokens, 32)


def test_tied_embedding_is_stored_once(tmp_path):
    torch.manual_seed(4)
    model = tiny(n_layers=1, vocab_size=4096)  # a table that dominates the file
    weight_bytes, table_bytes = 4 * model.num_params(), 4 * model.embed_tokens.weight.numel()
    info = export_pte(copy.deepcopy(model), tmp_path / "t.pte", max_len=32)
    assert info["bytes"] < weight_bytes + table_bytes // 2, (info["bytes"], weight_bytes, table_bytes)
    prompt = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        ref = model(prompt)[0]
    assert (PteRunner(tmp_path / "t.pte").forward(prompt[0].tolist(), 0) - ref).abs().max() <= 1e-4


def test_8da4w_pte_with_4bit_embedding_matches_our_quantized_model(tmp_path):
    torch.manual_seed(5)
    model = tiny(n_layers=1)
    info = export_pte(copy.deepcopy(model), tmp_path / "q.pte", quant="8da4w", max_len=MAX_LEN)
    assert info["embedding"] == "int4"  # the 8da4w default: ExecuTorch's recipe
    quantized = quantize_model(copy.deepcopy(model), "8da4w", group_size=32, embedding="int4")
    prompt = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref_q, ref_f = quantized(prompt)[0], model(prompt)[0]
    got = PteRunner(tmp_path / "q.pte").forward(prompt[0].tolist(), 0)
    # the output matrix also runs with int8 activations in the .pte (float in our eager model)
    assert (got - ref_q).abs().max() <= 2e-2 * ref_q.abs().max()
    assert (got - ref_f).abs().max() <= 0.2 * ref_f.abs().max()  # 4-bit weights and table
    assert (got - ref_f).abs().max() > (got - ref_q).abs().max()
    float_table = export_pte(copy.deepcopy(model), tmp_path / "f.pte", quant="8da4w", embedding="none",
                             max_len=MAX_LEN)["bytes"]
    table_bytes = 4 * model.embed_tokens.weight.numel()
    assert info["bytes"] < float_table - table_bytes // 2  # the table is 4-bit, not float
    import json

    from mobilellm.bench import prompt_ids

    run_cli("bench", tmp_path / "q.pte", "--threads", "1", "--prompt-tokens", "16", "--new-tokens", "8", "--json",
            tmp_path / "r.json", check=True)  # the worker finds the quantized embedding kernels
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["output_ids"] == pte_greedy(PteRunner(tmp_path / "q.pte"), prompt_ids(16, 512), 8)


def test_8da4w_pte_matches_our_quantized_model(tmp_path):
    torch.manual_seed(2)
    model = tiny()
    quantized = quantize_model(copy.deepcopy(model), "8da4w", group_size=32)
    export_pte(copy.deepcopy(model), tmp_path / "q.pte", quant="8da4w", embedding="none", max_len=MAX_LEN)
    prompt = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref_q, ref_f = quantized(prompt)[0], model(prompt)[0]
    got = PteRunner(tmp_path / "q.pte").forward(prompt[0].tolist(), 0)
    # XNNPACK's integer kernels vs our float simulation of the same integers: rounding-level differences
    assert (got - ref_q).abs().max() <= 2e-2 * ref_q.abs().max()
    assert (got - ref_f).abs().max() > (got - ref_q).abs().max()  # it really is the quantized model
    fp32_size = export_pte(copy.deepcopy(model), tmp_path / "f.pte", max_len=MAX_LEN)["bytes"]
    assert (tmp_path / "q.pte").stat().st_size < fp32_size


def test_export_cli_w8a8_dir_to_pte_and_bad_combinations(tmp_path):
    torch.manual_seed(3)
    model = tiny(n_layers=1)
    save_model_dir(model, tmp_path / "f")
    save_model_dir(quantize_model(copy.deepcopy(model), "w8a8"), tmp_path / "q")
    proc = run_cli("export", tmp_path / "q", "--format", "pte", "--max-len", "32", "--output", tmp_path / "q.pte",
                   check=True)
    assert "w8a8" in proc.stdout  # a quantized directory exports with its own scheme
    quantized = quantize_model(copy.deepcopy(model), "w8a8")
    prompt = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        ref = quantized(prompt)[0]
    got = PteRunner(tmp_path / "q.pte").forward(prompt[0].tolist(), 0)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    save_model_dir(quantize_model(copy.deepcopy(model), "int8"), tmp_path / "wo")
    for args, needle in [
        ((tmp_path / "f", "--precision", "q4_0"), "not available for pte"),
        ((tmp_path / "wo",), "no XNNPACK kernel"),
        ((tmp_path / "q", "--precision", "8da4w"), "already quantized"),
        ((tmp_path / "f", "--max-len", "100000"), "exceeds the model's context"),
        ((tmp_path / "f", "--embedding", "int4"), "needs a quantized --precision"),
        ((tmp_path / "q", "--embedding", "int4"), "already quantized with --embedding none"),
    ]:
        proc = run_cli("export", *args, "--format", "pte", "--output", tmp_path / "bad.pte")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert not (tmp_path / "bad.pte").exists()


def test_bench_runs_the_pte_and_decodes_the_same_tokens(tmp_path, fp32_pte):
    import json

    from mobilellm.bench import prompt_ids

    model, path, _ = fp32_pte
    run_cli("bench", path, "--threads", "1", "--prompt-tokens", "16", "--new-tokens", "8", "--json",
            tmp_path / "r.json", check=True)
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["runtime"] == "executorch" and row["decode_ms_per_token"] > 0 and row["peak_rss_mib"] > 0
    assert row["output_ids"] == greedy_tokens(model, prompt_ids(16, 512), 8)
