"""Generation engine: parity with transformers, batching, sampling, streaming, stops, limits, CLI."""

import json

import pytest
import torch

import conftest

from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.inference import (Engine, IncrementalDetokenizer, SamplingParams, StopStrings, load_engine,
                                next_token)
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import load_tokenizer, train_tokenizer

# A small corpus with accents, CJK and emoji, so that some characters span several byte-level tokens.
_WORDS = ("the model runs on a phone and answers fast while the cache keeps keys and values for every layer "
          "café naïve déjà vu 東京 大阪 ünïcödé").split()


def corpus(n: int = 300) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (12,), generator=g)) + "."
            for _ in range(n)]


def run_cli(*args, **kwargs):
    return conftest.run_cli(*args, env={"OMP_NUM_THREADS": "1"}, **kwargs)


def make_model_dir(root, preset: str = "mobilellm-tiny", seed: int = 0, **overrides):
    """A random tiny model saved with a freshly trained byte-level BPE tokenizer (no shared data needed)."""
    tok = train_tokenizer(corpus(), vocab_size=320)
    torch.manual_seed(seed)
    # no BOS/EOS ids in the config: transformers' greedy generate must not stop early on random weights
    cfg = get_preset(preset, vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=None, **overrides)
    model = MobileLLM(cfg).eval()
    save_model_dir(model, root, tokenizer=tok)
    return model, tok


one_thread = pytest.fixture(scope="module", autouse=True)(conftest.one_thread)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "tiny"
    make_model_dir(root)
    return root


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen_ls")
    model, tok = make_model_dir(base / "ls", "mobilellm-tiny-ls", seed=1)
    save_model_dir(model, base / "flat", tokenizer=tok, unroll=True)
    return base / "ls", base / "flat"


@pytest.fixture(scope="module")
def engine(plain_dir):
    return load_engine(plain_dir, max_batch=4)


def require_native():
    from mobilellm.inference.native import NativeUnavailable, library

    try:
        library()
    except NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Both engine backends; native is skipped (with the reason) where its C library cannot be built."""
    if request.param == "native":
        require_native()
    return request.param


PROMPTS = ["the model", "café naïve déjà vu and the cache keeps", "東京",
           "values for every layer while the phone"]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def hf_greedy(model_dir, ids, n):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def test_greedy_matches_transformers_on_exported_llama(plain_dir, backend):
    eng = load_engine(plain_dir, backend=backend)
    assert eng.backend.name == backend
    ids = eng.encode(PROMPTS[1])
    ours = eng.generate([ids], SamplingParams(max_new_tokens=64, ignore_eos=True))[0]
    assert len(ours.token_ids) == 64 and ours.finish_reason == "length"
    assert ours.token_ids == hf_greedy(plain_dir, ids, 64)


def test_layer_shared_greedy_matches_transformers_on_unrolled_export(shared_dirs, backend):
    ls_dir, flat_dir = shared_dirs
    eng = load_engine(ls_dir, backend=backend)
    assert eng.config.n_logical_layers == 2 * eng.config.n_layers
    assert eng.backend.cache.k.shape[0] == eng.config.n_logical_layers  # one cache slot per logical layer
    ids = eng.encode(PROMPTS[0])
    ours = eng.generate([ids], SamplingParams(max_new_tokens=64, ignore_eos=True))[0]
    assert ours.token_ids == hf_greedy(flat_dir, ids, 64)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9,
                                                           repetition_penalty=1.3, seed=7, ignore_eos=True)],
                         ids=["greedy", "sampled"])
def test_batched_generation_equals_one_by_one(plain_dir, backend, params):
    engine = load_engine(plain_dir, max_batch=4, backend=backend)
    batched = engine.generate(PROMPTS, params)
    assert len({len(engine.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # really different prompt lengths
    alone = load_engine(plain_dir, max_batch=1, backend=backend)
    for prompt, res in zip(PROMPTS, batched):
        assert alone.generate([prompt], params)[0].token_ids == res.token_ids
    # more prompts than rows: requests join as rows free up (continuous batching) and still match
    small = load_engine(plain_dir, max_batch=3, backend=backend)
    again = small.generate(PROMPTS + PROMPTS[:2], params)
    assert [r.token_ids for r in again] == [r.token_ids for r in batched] + [r.token_ids for r in batched[:2]]


def test_a_request_joining_a_running_batch_gets_its_own_tokens(plain_dir, backend):
    """A short request frees row 0 while a long one decodes in row 1; the next request reuses row 0."""
    eng = load_engine(plain_dir, max_batch=2, backend=backend)
    short, long, late = (eng.make_request(eng.encode(p), SamplingParams(max_new_tokens=n, ignore_eos=True))
                         for p, n in ((PROMPTS[0], 3), (PROMPTS[1], 30), (PROMPTS[2], 40)))
    for r in (short, long, late):
        eng.submit(r)
    while eng.has_work():
        eng.step()
    assert late.row == 0 and long.row == 1
    alone = load_engine(plain_dir, backend=backend)
    for r in (short, long, late):
        assert alone.generate([r.prompt_ids], r.params)[0].token_ids == r.output_ids
    # row 0 holds the keys/values `late` gets alone (it finishes last, so no later step reuses row 0)
    n = len(late.prompt_ids) + len(late.output_ids) - 1
    torch.testing.assert_close(eng.backend.cache.k[:, 0, :, :n], alone.backend.cache.k[:, 0, :, :n])


def test_sampling_is_reproducible_with_a_seed(engine):
    params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=123, ignore_eos=True)
    a = engine.generate([PROMPTS[0]], params)[0].token_ids
    b = engine.generate([PROMPTS[0]], params)[0].token_ids
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=32, temperature=1.0, seed=124,
                                                      ignore_eos=True))[0].token_ids
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=32, ignore_eos=True))[0].token_ids
    assert a == b and a != c and a != greedy


def test_next_token_filters():
    logits = torch.tensor([1.0, 5.0, 4.9, -3.0])
    assert next_token(logits, SamplingParams()) == 1
    # repetition penalty: a seen positive logit is divided, enough to hand the win to token 2
    seen = torch.tensor([False, True, False, False])
    assert next_token(logits, SamplingParams(repetition_penalty=1.5), seen) == 2
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, SamplingParams(temperature=5.0, top_k=2), None, g) for _ in range(200)}
    assert picks == {1, 2}
    picks = {next_token(torch.tensor([3.0, 2.0, 0.0, -5.0]), SamplingParams(temperature=1.0, top_p=0.5), None, g)
             for _ in range(100)}
    assert picks == {0}  # token 0 alone holds more than half the mass


def test_streaming_yields_the_same_text_as_non_streaming(engine):
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    for prompt in PROMPTS:
        whole = engine.generate([prompt], params)[0]
        deltas = list(engine.stream(prompt, params))
        assert "".join(deltas) == whole.text == engine.tokenizer.decode(whole.token_ids)
        assert engine.last.token_ids == whole.token_ids
        assert len(deltas) > 1


def test_incremental_detokenizer_never_splits_a_character():
    tok = train_tokenizer(corpus(), vocab_size=320)
    text = " café 東京 😀 naïve ✓"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters really are split over byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_keeps_sentencepiece_spaces():
    from conftest import shared_data

    tok = load_tokenizer(shared_data("tokenizers", "llama2", "tokenizer.model"))
    prompt, continuation = tok.encode("Hello", bos=True), tok.encode("Hello world, déjà 東京!")[1:]
    detok = IncrementalDetokenizer(tok, prompt)
    out = "".join(detok.push(i) for i in continuation) + detok.flush()
    assert out == " world, déjà 東京!"


def test_stop_strings(engine):
    base = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].text
    stop = base[12:15]  # a piece from the middle of the greedy output
    cut = base[:base.index(stop)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, stop=["never-there", stop])
    res = engine.generate([PROMPTS[3]], params)[0]
    assert res.text == cut and res.finish_reason == "stop"
    assert "".join(engine.stream(PROMPTS[3], params)) == cut


def test_stop_string_split_over_deltas():
    s = StopStrings(["STOP"])
    out = [s.push("abc ST"), s.push("O"), s.push("P and more")]
    assert out == ["abc ", "", ""] and s.hit and s.text == "abc "
    s = StopStrings(["STOP"])
    out = [s.push("abc ST"), s.push("OX")] + [s.flush()]
    assert "".join(out) == "abc STOX" and not s.hit


def test_eos_stops_generation(plain_dir):
    eng = load_engine(plain_dir)
    sampled = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    first = eng.generate([PROMPTS[0]], sampled)[0].token_ids
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # first new token after the start
    sampled.stop_token_ids = [first[k]]
    res = eng.generate([PROMPTS[0]], sampled)[0]
    assert res.token_ids == first[:k + 1] and res.finish_reason == "stop"
    assert res.text == eng.tokenizer.decode(first[:k])  # the stop token's own text is not returned


def test_context_limits(plain_dir):
    eng = load_engine(plain_dir, max_len=40)
    with pytest.raises(MobileLLMError, match="context is 40"):
        eng.generate([list(range(3, 43))], GREEDY)
    res = eng.generate([list(range(3, 33))], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert len(res.token_ids) == 10 and res.finish_reason == "length"  # prompt + output fill the context exactly
    with pytest.raises(MobileLLMError, match="max_new_tokens"):
        eng.generate(["x"], SamplingParams(max_new_tokens=0))
    with pytest.raises(MobileLLMError, match="outside the vocabulary"):
        eng.generate([[5, 10_000]], GREEDY)
    with pytest.raises(MobileLLMError, match="top_p"):
        eng.generate(["x"], SamplingParams(top_p=0))


@pytest.mark.parametrize("weights", ["bf16", "fp16", "int8"])
def test_low_precision_weights_stay_close_to_fp32(plain_dir, weights, backend):
    ref = load_engine(plain_dir, backend=backend)
    low = load_engine(plain_dir, precision=weights, backend=backend)
    assert low.weight_bytes() < ref.weight_bytes()
    ids = ref.encode(PROMPTS[1])
    with torch.inference_mode():
        for eng in (ref, low):
            eng.logits = eng.backend.prefill(0, ids)
    err = (low.logits - ref.logits).abs().max() / ref.logits.std()
    assert err < 0.15, f"{weights} logits differ by {err:.3f} std"
    assert len(low.generate([ids], GREEDY)[0].token_ids) == GREEDY.max_new_tokens


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
@pytest.mark.parametrize("chunk", [None, 48])
def test_native_and_torch_backends_agree(plain_dir, weights, chunk, monkeypatch):
    """Same logits (to float rounding) over a 101-token prompt, and the same greedy tokens; the native
    library's KV cache equals the torch backend's. The native prefill runs in chunks (two at the
    default, three at 48 tokens), causal across calls."""
    from mobilellm.inference import native as native_module

    if chunk:
        monkeypatch.setattr(native_module, "PREFILL_CHUNK", chunk)
    require_native()
    native = load_engine(plain_dir, precision=weights, backend="native", max_len=200)
    torch_engine = load_engine(plain_dir, precision=weights, backend="torch", max_len=200)
    ids = [int(i) for i in torch.randint(0, native.config.vocab_size, (101,),
                                         generator=torch.Generator().manual_seed(3))]
    with torch.inference_mode():
        logits = []
        for eng in (native, torch_engine):
            logits.append(eng.backend.prefill(0, ids))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native.backend.cache.k[:, 0, :, :len(ids)], torch_engine.backend.cache.k[:, 0, :, :len(ids)],
                               rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    assert native.generate([ids], params)[0].token_ids == torch_engine.generate([ids], params)[0].token_ids


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_native_low_precision_batched_equals_alone(plain_dir, weights):
    """Low precision (int8: int8 activations per token): a row's tokens do not depend on its neighbours."""
    require_native()
    batched = load_engine(plain_dir, max_batch=4, precision=weights, backend="native").generate(PROMPTS, GREEDY)
    alone = load_engine(plain_dir, precision=weights, backend="native")
    assert [r.token_ids for r in batched] == [alone.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_native_backend_unavailable(plain_dir, tmp_path, monkeypatch):
    """No compiler: auto falls back to torch with a note, --backend native fails in one clear line."""
    from mobilellm.inference import native

    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("MOBILELLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(MobileLLMError, match="no C compiler"):
        load_engine(plain_dir, backend="native")
    assert load_engine(plain_dir).backend.name == "torch"
    monkeypatch.delenv("CC")
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(MobileLLMError, match="compiling the native kernels failed") as err:
        native.library()
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind
    with pytest.raises(MobileLLMError, match="unknown backend"):
        load_engine(plain_dir, backend="gpu")


@pytest.mark.slow
def test_compiled_decode_matches_eager(plain_dir):
    eager = load_engine(plain_dir, max_len=64, backend="torch")
    compiled = load_engine(plain_dir, max_len=64, compile=True)  # one graph: batch of one, fixed cache length
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        assert compiled.generate([prompt], params)[0].token_ids == eager.generate([prompt], params)[0].token_ids


def test_generate_cli(plain_dir, engine, tmp_path):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [r.text for r in engine.generate(PROMPTS[:2], params)]
    out = run_cli("generate", plain_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", 12,
                  "--ignore-eos", "--json", check=True).stdout
    assert [json.loads(line)["text"] for line in out.splitlines()] == expected
    streamed = run_cli("generate", plain_dir, "--prompt", PROMPTS[0], "--max-new-tokens", 12, "--ignore-eos",
                       "--stream", "--verbose", check=True)
    assert streamed.stdout == expected[0] + "\n"
    assert "tok/s" in streamed.stderr and "peak RSS" in streamed.stderr
    piped = run_cli("generate", plain_dir, "--max-new-tokens", 12, "--ignore-eos", input=PROMPTS[0], check=True)
    assert piped.stdout == expected[0] + "\n"
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    from_file = run_cli("generate", plain_dir, "--prompt-file", tmp_path / "prompts.txt", "--max-new-tokens", 12,
                        "--ignore-eos", "--json", check=True).stdout
    assert [json.loads(line)["text"] for line in from_file.splitlines()] == expected
    via_torch = run_cli("generate", plain_dir, "--prompt", PROMPTS[0], "--max-new-tokens", 12, "--ignore-eos",
                        "--backend", "torch", check=True)
    assert via_torch.stdout == expected[0] + "\n"


def test_generate_cli_bad_input(plain_dir, tmp_path):
    for args, message in [
        (("generate", tmp_path / "missing", "--prompt", "x"), "does not exist"),
        (("generate", plain_dir, "--prompt", "x", "--top-p", "2"), "top_p"),
        (("generate", plain_dir, "--prompt", "x " * 300), "context"),
        (("generate", plain_dir, "--prompt-file", tmp_path / "nope.txt"), "cannot read prompt file"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode != 0 and proc.stderr.startswith("error:") and message in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
    # a model directory without tokenizer files
    save_model_dir(MobileLLM(get_preset("mobilellm-tiny")), tmp_path / "notok")
    proc = run_cli("generate", tmp_path / "notok", "--prompt", "x")
    assert proc.returncode != 0 and "no tokenizer" in proc.stderr


def test_engine_accepts_token_ids_without_tokenizer():
    model = MobileLLM(get_preset("mobilellm-tiny", bos_token_id=None, eos_token_id=None)).eval()
    eng = Engine(model, max_batch=2)
    res = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    assert [len(r.token_ids) for r in res] == [6, 6] and res[0].text == ""
    with pytest.raises(MobileLLMError, match="no tokenizer"):
        eng.generate(["text"], GREEDY)


@pytest.mark.parametrize("backend_name", ["native", "torch"])
def test_backend_refuses_what_does_not_fit_its_cache(backend_name):
    """Positions past the cache, rows that do not exist and unknown token ids are one-line errors
    (the native kernels would write and read outside their buffers)."""
    from mobilellm.errors import MobileLLMError
    from mobilellm.inference.select import build_backend

    torch.manual_seed(0)
    model = MobileLLM(get_preset("mobilellm-tiny", vocab_size=64))
    try:
        backend = build_backend(model, "fp32", backend=backend_name, max_batch=2, max_len=8)
    except Exception as exc:  # no C compiler: the native backend is unavailable here
        pytest.skip(f"{backend_name} backend unavailable: {exc}")
    with pytest.raises(MobileLLMError, match="do not fit"):
        backend.prefill(0, list(range(1, 10)))
    backend.prefill(0, list(range(1, 8)))
    backend.decode([0], [3])  # position 7: the last one
    with pytest.raises(MobileLLMError, match="do not fit"):
        backend.decode([0], [3])
    with pytest.raises(MobileLLMError, match="does not exist"):
        backend.decode([2], [3])
    with pytest.raises(MobileLLMError, match="token ids"):
        backend.prefill(1, [1, 64])
    backend.free(0)
    assert backend.prefill(0, [1, 2]).shape == (64,)
