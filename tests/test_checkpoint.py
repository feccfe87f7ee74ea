import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from mobilellm.checkpoint import load_config, load_model_dir, save_model_dir, unrolled
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.model import KVCache, MobileLLM

transformers = pytest.importorskip("transformers")


def tiny(preset="mobilellm-tiny", **changes):
    # no BOS/EOS ids: greedy generation in transformers must not stop early on random weights
    return MobileLLM(get_preset(preset, bos_token_id=None, eos_token_id=None, **changes)).eval()


def greedy(model, prompt, n):
    cache = KVCache(model.config, batch_size=prompt.shape[0], max_len=prompt.shape[1] + n)
    out, tokens, start = [], prompt, 0
    with torch.no_grad():
        for _ in range(n):
            nxt = model(tokens, cache=cache, start=start)[:, -1].argmax(-1, keepdim=True)
            start += tokens.shape[1]
            tokens = nxt
            out.append(nxt)
    return torch.cat(out, 1)


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_plain_model_dir_is_a_llama_that_transformers_loads(tmp_path):
    model = tiny()
    save_model_dir(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")  # no duplicated output matrix
    hf = hf_load(tmp_path / "m")
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4
    prompt = tokens[:1, :8]
    ours = greedy(model, prompt, 32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)[:, 8:]
    assert torch.equal(ours, theirs)


def test_layer_shared_model_matches_its_unrolled_llama(tmp_path):
    model = tiny("mobilellm-tiny-ls")
    save_model_dir(model, tmp_path / "ls")
    save_model_dir(model, tmp_path / "flat", unroll=True)
    # shared format stores each block once; unrolled one is a plain Llama with 2x the layers
    assert load_config(tmp_path / "ls").n_layers == 4
    assert len([k for k in load_file(tmp_path / "ls" / "model.safetensors") if "q_proj" in k]) == 4
    flat_cfg = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert flat_cfg["model_type"] == "llama" and flat_cfg["num_hidden_layers"] == 8
    hf = hf_load(tmp_path / "flat")
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4
    reloaded = load_model_dir(tmp_path / "ls")
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))
    prompt = tokens[:1, :8]
    assert torch.equal(greedy(model, prompt, 32), hf.generate(prompt, max_new_tokens=32, do_sample=False)[:, 8:])


@pytest.mark.parametrize("strategy", ["repeat_all", "reverse"])
def test_other_strategies_unroll_exactly(strategy):
    model = tiny(layer_sharing=strategy, share_repeats=2)
    flat = unrolled(model)
    tokens = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(flat(tokens), model(tokens))


@pytest.mark.parametrize("changes", [{"tie_embeddings": False}, {"ffn_type": "relu"}])
def test_ablation_variants_round_trip(tmp_path, changes):
    model = tiny(**changes)
    save_model_dir(model, tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_official_mobilellm_checkpoint_loads(tmp_path):
    """Official layout: model_type mobilellm, share_embedding, layer_sharing, fp16 .bin without lm_head."""
    model = tiny("mobilellm-tiny-ls").half().float()  # fp16-representable weights
    c = model.config
    official = {
        "architectures": ["MobileLLMForCausalLM"], "model_type": "mobilellm", "auto_map": {},
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "share_embedding": True, "layer_sharing": True, "tie_word_embeddings": False,
        "use_cache": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }
    d = tmp_path / "official"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(official))
    torch.save({f"model.{k}": v.half() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    # a wrong auto-converted safetensors beside it must be ignored in favour of the .bin
    from safetensors.torch import save_file
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(d / "model.safetensors"))
    loaded = load_model_dir(d)
    assert loaded.config.layer_sharing == "immediate" and loaded.config.share_repeats == 2
    assert loaded.config.tie_embeddings
    tokens = torch.randint(0, c.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_llama_tied_checkpoint_from_transformers_loads(tmp_path):
    """SmolLM2-135M layout: a Llama with tie_word_embeddings written by transformers itself."""
    hc = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  max_position_embeddings=128, rope_theta=10000.0)
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model_dir(tmp_path / "hf")
    assert ours.config.tie_embeddings and ours.config.n_layers == 3
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4


def test_bad_model_dirs_give_clear_errors(tmp_path):
    with pytest.raises(MobileLLMError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobileLLMError, match="not a model directory"):
        load_model_dir(tmp_path / "empty")
    model = tiny()
    d = save_model_dir(model, tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MobileLLMError, match="truncated or corrupt"):
        load_model_dir(d)
    # a .bin cut short
    d2 = tmp_path / "bin"
    save_model_dir(model, d2)
    (d2 / "model.safetensors").unlink()
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, d2 / "pytorch_model.bin")
    b = (d2 / "pytorch_model.bin").read_bytes()
    (d2 / "pytorch_model.bin").write_bytes(b[:1000])
    with pytest.raises(MobileLLMError, match="truncated or corrupt"):
        load_model_dir(d2)
    # config and weights disagree
    d3 = save_model_dir(model, tmp_path / "mismatch")
    cfg = json.loads((d3 / "config.json").read_text())
    cfg["mobilellm"]["n_layers"] = 5
    (d3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MobileLLMError, match="do not match its config"):
        load_model_dir(d3)
    cfg["mobilellm"]["n_layers"] = 4
    cfg["mobilellm"]["ffn_dim"] = 100
    (d3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MobileLLMError, match="has shape"):
        load_model_dir(d3)


def test_failed_save_keeps_previous_directory(tmp_path):
    model = tiny()
    d = save_model_dir(model, tmp_path / "m")
    before = (d / "model.safetensors").read_bytes()

    class Boom:
        def save(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model_dir(tiny(), d, tokenizer=Boom())
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_info_cli(tmp_path):
    out = run_cli("info", "mobilellm-125m", check=True).stdout
    assert "124.6M" in out and "30 physical blocks" in out
    save_model_dir(tiny("mobilellm-tiny-ls"), tmp_path / "ls")
    out = run_cli("info", tmp_path / "ls", check=True).stdout
    assert "4 physical blocks, 8 logical layers" in out
    bad = run_cli("info", "mobilellm-9b")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "unknown preset" in bad.stderr


def test_atomic_writes_use_normal_permissions(tmp_path):
    import os
    import stat

    from mobilellm.fileio import write_text_atomic

    write_text_atomic(tmp_path / "f.txt", "x")
    d = save_model_dir(tiny(), tmp_path / "m")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask


def test_safetensors_reader_matches_the_library(tmp_path):
    """Our loader (each entry mapped on its own) gives what safetensors' own loader gives, for every dtype
    we store, and refuses a file that ends inside an entry."""
    from safetensors.torch import save_file

    from mobilellm.checkpoint import _read_safetensors

    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "b16": torch.randn(2, 3).bfloat16(),
               "q": torch.arange(-4, 4, dtype=torch.int8), "mask": torch.tensor([True, False]),
               "step": torch.tensor(7), "empty": torch.empty(0, 5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours, theirs = _read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="ends inside"):
        _read_safetensors(path)
