"""Scoring against plain full forwards: packed log-likelihoods, acc/acc_norm, perplexity windows."""

import math

import pytest
import torch
import torch.nn.functional as F

from mobilellm.config import get_preset
from mobilellm.eval import tasks as T
from mobilellm.eval.evaluator import sample_stderr, score_choice_task, score_lambada
from mobilellm.eval.perplexity import windows_perplexity
from mobilellm.eval.scoring import LoglikelihoodScorer, encode_pair
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up roofing. "
        "Question: Which gas do plants absorb? Answer: carbon dioxide. The sun is responsible for plants sprouting. ")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT * 3], vocab_size=400, min_frequency=1, chat_template=None)


def tiny_model(preset="mobilellm-tiny", **kw):
    torch.manual_seed(0)
    # init_std 0.5: peaked random distributions, so choices differ by clear margins
    return MobileLLM(get_preset(preset, init_std=0.5, **kw)).eval()


def full_forward_loglik(model, tokenizer, context, continuation, max_length):
    """lm-eval's recipe with one unpadded full forward per request."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    full = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0]  # (T, V)
    n = len(cont)
    target = torch.tensor(full[-n:])
    picked = logp[-n:]
    return float(picked.gather(1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_spaces(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "carbon dioxide")
    assert ctx == tokenizer.encode("Answer:", bos=True)
    assert ctx + cont == tokenizer.encode("Answer: carbon dioxide", bos=True)


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
def test_packed_scores_equal_one_forward_per_request(tokenizer, preset):
    model = tiny_model(preset, max_seq_len=48)
    long_ctx = TEXT * 2  # longer than the context: left-truncated as lm-eval does
    requests = [("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
                ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
                ("Question: Which gas do plants absorb?\nAnswer:", " x"),
                ("A man is sitting on a roof. He", " starts pulling up roofing."),
                (long_ctx, " the lazy dog."), ("The sun is", " responsible for plants sprouting on a roof" * 3)]
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=3)
    got = scorer.score(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = full_forward_loglik(model, tokenizer, ctx, cont, 48)
        assert ll == pytest.approx(ref_ll, abs=1e-3)
        assert greedy == ref_greedy
    # shared contexts are packed into one row: 3 choices of one question -> 1 row
    rows = scorer._pack(scorer.encode(requests[:3]))
    assert len(rows) == 1 and len(rows[0].branches) == 3


def test_acc_and_acc_norm_follow_hand_computed_loglikelihoods(tokenizer):
    model = tiny_model()
    docs = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it hard with a hammer", "label": 0},
            {"goal": "Dry hair", "sol1": "use a towel", "sol2": "use a fox", "label": 1},
            {"goal": "Go up", "sol1": "jump", "sol2": "take the roof stairs slowly", "label": 1}]
    examples = [T.piqa_example(d) for d in docs]
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=2)
    res = score_choice_task(scorer, examples, ("acc", "acc_norm"), desc="piqa")
    acc, acc_norm = [], []
    for ex in examples:
        lls = [full_forward_loglik(model, tokenizer, c, x, 256)[0] for c, x in ex.requests]
        acc.append(float(max(range(2), key=lambda i: lls[i]) == ex.gold))
        normed = [ll / len(choice) for ll, choice in zip(lls, ex.choices)]  # lm-eval: characters of the choice
        acc_norm.append(float(max(range(2), key=lambda i: normed[i]) == ex.gold))
    assert res["acc"] == pytest.approx(sum(acc) / 3)
    assert res["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert res["n"] == 3
    p = sum(acc) / 3
    assert res["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2))
    per_doc = score_choice_task(scorer, examples, ("acc", "acc_norm"), desc="piqa", per_example=True)
    assert per_doc["correct"] == [int(a) for a in acc_norm] and "correct" not in res


def test_lambada_acc_is_greedy_match_and_ppl(tokenizer):
    model = tiny_model()
    examples = [T.lambada_example({"context": "The quick brown fox jumps over the lazy", "continuation": "dog"}),
                T.lambada_example({"context": "A man is sitting on a", "continuation": "roof"})]
    res = score_lambada(LoglikelihoodScorer(model, tokenizer), examples)
    refs = [full_forward_loglik(model, tokenizer, *ex.requests[0], 256) for ex in examples]
    assert res["ppl"] == pytest.approx(math.exp(-sum(r[0] for r in refs) / 2), rel=1e-4)
    assert res["acc"] == sum(r[1] for r in refs) / 2


def reference_window_ppl(model, ids, window):
    """The reference loop: non-overlapping windows, mean CE per window, exp of the mean."""
    n = len(ids) // window
    losses = []
    with torch.no_grad():
        for i in range(n):
            chunk = torch.tensor([ids[i * window:(i + 1) * window]])
            logits = model(chunk)
            losses.append(F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:]).item())
    return math.exp(sum(losses) / n)


def test_wikitext_windows_equal_reference_loop(tokenizer):
    model = tiny_model(max_seq_len=64)
    ids = tokenizer.encode(TEXT * 4, bos=True)
    res = windows_perplexity(model, ids, window=64, batch_size=3)
    assert res["windows"] == len(ids) // 64 and res["tokens"] == res["windows"] * 63
    assert res["ppl"] == pytest.approx(reference_window_ppl(model, ids, 64), rel=1e-5)


def test_sliding_window_scores_every_token_once_with_context(tokenizer):
    model = tiny_model(max_seq_len=32)
    ids = tokenizer.encode(TEXT * 2, bos=True)
    res = windows_perplexity(model, ids, window=32, stride=16)
    assert res["tokens"] == len(ids) - 1
    # reference: token t (t >= 1) scored once, with the context of the window that first covers it
    total, scored_until = 0.0, 1
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 16):
            end = min(begin + 32, len(ids))
            logp = F.log_softmax(model(torch.tensor([ids[begin:end]])).float(), -1)[0]
            for t in range(max(scored_until, begin + 1), end):
                total -= logp[t - 1 - begin, ids[t]].item()
            scored_until = max(scored_until, end)
            if end == len(ids):
                break
    assert res["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_sample_stderr_matches_formula():
    values = [1.0, 0.0, 1.0, 1.0]
    assert sample_stderr(values) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert sample_stderr([1.0]) is None
