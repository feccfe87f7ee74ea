"""lm-evaluation-harness adapter: `--model mobilellm --model_args pretrained=<model dir>`.

lm-eval 0.4.x finds models only through its registry (no plugin entry points), so this module calls
`register_model` on import; `python -m mobilellm.eval.harness ...` is lm-eval's own command line with
the adapter registered (docs/eval.md)."""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mobilellm.checkpoint import load_model_and_tokenizer
from mobilellm.eval.scoring import LoglikelihoodScorer
from mobilellm.model import KVCache
from mobilellm.precision import float_dtype
from mobilellm.sysinfo import resolve_device


@register_model("mobilellm")
class MobileLLMHarnessLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int | str = 32, max_length: int | None = None, **_ignored):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI asks for cuda by default; HFLM falls back the same way
        self.device_ = resolve_device(str(device))
        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, device=self.device_, dtype=float_dtype(dtype),
                                                              tokenizer=tokenizer)
        # lm-eval passes "auto" or a string; "auto" has no meaning here: use our default
        bs = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else self.model.config.max_seq_len
        self.scorer = LoglikelihoodScorer(self.model, self.tokenizer, batch_size=bs, device=self.device_,
                                          max_length=self.max_length, progress=True)

    # ---- lm-eval's tokenization conventions (TemplateLM / HFLM) --------------------------------
    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token()

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=bool(self.tokenizer.add_bos))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (req.args for req in requests):
            if context == "":
                cont = self.tokenizer.encode(continuation)
                # BOS/EOS as context, unless the continuation already starts with it (lm-eval's rule)
                prefix = self.prefix_token_id
                pairs.append(([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:]))
            else:
                pairs.append(self.scorer.encode([(context, continuation)])[0])
        return self.scorer.score_tokens(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Disjoint windows of the whole document with maximal context (HFLM's way)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self._tok(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((list(ctx), list(cont)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self.scorer.score_tokens(windows, desc="loglikelihood_rolling")):
            totals[owner] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache, one request at a time, cut at the first stop string."""
        outputs = []
        eos_id = self.tokenizer.eos_id
        eos = self.tokenizer.decode([eos_id], skip_special=False) if eos_id is not None else None
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            keep = self.max_length - max_new if max_new < self.max_length else 1  # room for the new tokens
            prompt = self._tok(context)[-keep:]
            text = self._greedy(prompt, max_new, until + ([eos] if eos else []))
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs

    @torch.inference_mode()
    def _greedy(self, prompt: list[int], max_new: int, stops: list[str]) -> str:
        model = self.model
        cache = KVCache(model.config, 1, len(prompt) + max_new, device=self.device_, dtype=model.output_weight.dtype)
        tokens = torch.tensor([prompt], device=self.device_)
        start, new = 0, []
        for _ in range(max_new):
            logits = model(tokens, cache=cache, start=start)[:, -1]  # (1, V)
            start += tokens.shape[1]
            nxt = int(logits.argmax(-1))
            if nxt == self.tokenizer.eos_id:
                break
            new.append(nxt)
            text = self.tokenizer.decode(new)
            if any(s and s in text for s in stops):
                break
            tokens = torch.tensor([[nxt]], device=self.device_)
        return self.tokenizer.decode(new)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `mobilellm` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
