"""Directories `mobilellm quantize` writes run through generate, chat, serve, eval and bench on the weights it wrote."""

import copy
import json

import pytest
import torch

from mobilellm.checkpoint import load_model_dir
from mobilellm.inference import Engine, SamplingParams, load_engine
from mobilellm.quantize import float_modules
from test_generate import make_model_dir, one_thread, require_native, run_cli  # noqa: F401
from test_serve import Server

PROMPT = "the model runs on a phone"
PRECISIONS = ["int8", "int4", "int8-weight-only"]  # w8a8, 8da4w, int8 weight-only


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A float tiny model (every width a multiple of 32, as int4 groups need) and one quantized copy per scheme."""
    root = tmp_path_factory.mktemp("qdirs")
    make_model_dir(root / "float", ffn_dim=192, init_std=0.1)
    for precision in PRECISIONS:
        run_cli("quantize", root / "float", "--precision", precision, "--output", root / precision, check=True)
    return root


def cli_text(*args) -> str:
    out = run_cli("generate", *args, "--prompt", PROMPT, "--max-new-tokens", 16, "--ignore-eos", "--json", check=True)
    return json.loads(out.stdout)["text"]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_int8_dirs_generate_with_the_quantizers_own_integers(dirs, backend):
    """An int8 directory runs on its stored integers: the same text as the float model converted to int8 by
    the engine, which applies the same quantization rule."""
    if backend == "native":
        require_native()
    from_float = cli_text(dirs / "float", "--precision", "int8", "--backend", backend)
    for precision in ("int8", "int8-weight-only"):
        assert load_engine(dirs / precision, backend=backend).precision == "int8"
        assert cli_text(dirs / precision, "--backend", backend) == from_float


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_int4_dir_runs_its_own_integers_at_int4(dirs, backend):
    """--precision int4 on the int4 directory uses the stored integers: the same text as the float model
    quantized to int4 by the engine through the same rule (groups of 32)."""
    if backend == "native":
        require_native()
    assert cli_text(dirs / "int4", "--precision", "int4", "--backend", backend) == \
        cli_text(dirs / "float", "--precision", "int4", "--backend", backend)


def test_int4_dir_generates_on_its_dequantized_weights(dirs):
    """The int4 directory runs its int4 values exactly (dequantized to fp32): the same tokens as a float
    model holding those values."""
    quantized = load_model_dir(dirs / "int4")
    reference = Engine(float_modules(copy.deepcopy(quantized)), load_engine(dirs / "int4").tokenizer)
    expected = reference.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].text
    for backend in ("torch", "native"):
        if backend == "native":
            require_native()
        assert cli_text(dirs / "int4", "--backend", backend) == expected
    with torch.no_grad():  # and it is the quantized model: its weights differ from the float one's
        float_weight = load_model_dir(dirs / "float").layers[0].mlp.up_proj.weight
        assert not torch.equal(quantized.layers[0].mlp.up_proj.dequantized_weight(), float_weight)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_dirs_chat(dirs, precision):
    proc = run_cli("chat", dirs / precision, "--max-new-tokens", 8, "--temperature", 0, input="hello there\n/exit\n",
                   check=True)
    assert proc.stdout.strip() and "Traceback" not in proc.stderr


def test_quantized_dirs_serve(dirs):
    for precision in PRECISIONS:
        server = Server(dirs / precision)
        try:
            code, body = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
            assert code == 200, body
            expected = load_engine(dirs / precision).generate([PROMPT], SamplingParams(max_new_tokens=16))[0].text
            assert body["choices"][0]["text"] == expected
        finally:
            server.stop()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_dirs_eval_on_the_quantized_weights(dirs, tmp_path, precision):
    wiki = tmp_path / "data" / "wikitext2" / "raw"
    wiki.mkdir(parents=True)
    wiki.joinpath("wiki.test.raw").write_text(("the model runs on a phone and the cache is small. " * 40 + "\n") * 3)
    ppl = {}
    for name in ("float", precision):
        out = tmp_path / f"{name}.json"
        run_cli("eval", dirs / name, "--tasks", "wikitext2", "--data-dir", tmp_path / "data", "--output", out,
                "--no-progress", check=True)
        ppl[name] = json.loads(out.read_text())["results"]["wikitext2"]["ppl"]
    assert all(v > 0 and v == v for v in ppl.values()), ppl
    assert ppl[precision] != ppl["float"]  # the quantized weights were used, not a float copy


def test_quantized_dirs_bench(dirs):
    proc = run_cli("bench", dirs / "int8", "--new-tokens", 4, "--prompt-tokens", 4, check=True)
    assert "int8" in proc.stdout or str(dirs / "int8") in proc.stdout, proc.stdout
