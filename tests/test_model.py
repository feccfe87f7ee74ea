import pytest
import torch

from mobilellm.config import ModelConfig, get_preset, list_presets
from mobilellm.errors import MobileLLMError
from mobilellm.model import KVCache, MobileLLM

PAPER_PARAMS = {  # docs/paper.md "Architecture", as printed: (value, unit of the last printed digit)
    "mobilellm-125m": (124.6e6, 0.1e6),
    "mobilellm-350m": (345.3e6, 0.1e6),
    "mobilellm-600m": (603.1e6, 0.1e6),
    "mobilellm-1b": (1.01e9, 0.01e9),
    "mobilellm-1.5b": (1.51e9, 0.01e9),
}


@pytest.mark.parametrize("preset", PAPER_PARAMS)
def test_param_counts_match_paper(preset):
    value, unit = PAPER_PARAMS[preset]
    n = get_preset(preset).num_params()
    assert abs(n - value) < unit, (preset, n)


@pytest.mark.parametrize("base", ["mobilellm-125m", "mobilellm-350m"])
def test_layer_shared_preset_has_base_params_and_double_depth(base):
    cfg, ls = get_preset(base), get_preset(base + "-ls")
    assert ls.num_params() == cfg.num_params()
    assert ls.n_logical_layers == 2 * cfg.n_layers
    assert ls.layer_to_block[:4] == [0, 0, 1, 1]


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"ffn_type": "relu"}, {"n_kv_heads": 4},
                                     {"n_kv_heads": 1}])
def test_built_model_matches_analytic_count(preset, changes):
    cfg = get_preset(preset, **changes)
    assert MobileLLM(cfg).num_params() == cfg.num_params()


def test_schedules():
    def sched(strategy, k=2):
        return ModelConfig(n_layers=3, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=10,
                           layer_sharing=strategy, share_repeats=k if strategy != "none" else 1).layer_to_block

    assert sched("none") == [0, 1, 2]
    assert sched("immediate") == [0, 0, 1, 1, 2, 2]
    assert sched("immediate", 4) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert sched("repeat_all") == [0, 1, 2, 0, 1, 2]
    assert sched("reverse") == [0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("changes, message", [
    ({"n_heads": 5}, "does not divide dim"),
    ({"n_kv_heads": 3}, "does not divide n_heads"),
    ({"layer_sharing": "sideways", "share_repeats": 2}, "unknown layer_sharing"),
    ({"layer_sharing": "immediate", "share_repeats": 1}, "needs share_repeats"),
    ({"ffn_type": "gelu"}, "unknown ffn_type"),
    ({"dim": 0}, "positive integer"),
])
def test_invalid_configs_raise_one_line_errors(changes, message):
    with pytest.raises(MobileLLMError, match=message) as err:
        get_preset("mobilellm-tiny", **changes)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_keys():
    with pytest.raises(MobileLLMError, match="unknown preset"):
        get_preset("mobilellm-7b")
    with pytest.raises(MobileLLMError, match="unknown keys"):
        ModelConfig.from_dict({"dim": 64, "wat": 1})
    assert "mobilellm-125m-ls" in list_presets()


@pytest.mark.parametrize("strategy,k", [("none", 1), ("immediate", 2), ("immediate", 4), ("repeat_all", 2),
                                        ("reverse", 2)])
def test_kv_cache_decoding_matches_full_forward(strategy, k):
    cfg = get_preset("mobilellm-tiny", layer_sharing=strategy, share_repeats=k)
    model = MobileLLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, batch_size=2, max_len=32)
        pieces = [model(tokens[:, :9], cache=cache, start=0), model(tokens[:, 9:16], cache=cache, start=9)]
        pieces += [model(tokens[:, i:i + 1], cache=cache, start=i) for i in range(16, 24)]
    assert cache.k.shape[0] == cfg.n_logical_layers  # one slot per logical layer
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_shared_block_runs_have_separate_cache_slots():
    """The reference code's bug: both runs of a block writing one slot. Ours keeps them apart."""
    cfg = get_preset("mobilellm-tiny-ls")
    model = MobileLLM(cfg).eval()
    cache = KVCache(cfg, batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 5)), cache=cache)
    # logical layers 0 and 1 run the same block on different inputs -> different keys
    assert not torch.allclose(cache.k[0, :, :, :5], cache.k[1, :, :, :5])


def test_cache_overflow_is_a_clear_error():
    cfg = get_preset("mobilellm-tiny")
    model = MobileLLM(cfg).eval()
    cache = KVCache(cfg, batch_size=1, max_len=4)
    with pytest.raises(MobileLLMError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_init_std_and_no_biases():
    cfg = get_preset("mobilellm-tiny", vocab_size=4096, dim=128, n_heads=4, ffn_dim=512)
    model = MobileLLM(cfg)
    assert all("bias" not in name for name, _ in model.named_parameters())
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert model.lm_head is None and model.output_weight is model.embed_tokens.weight


def test_activation_checkpointing_gives_same_gradients():
    cfg = get_preset("mobilellm-tiny-ls")
    model = MobileLLM(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model(tokens).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(tokens).sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)
