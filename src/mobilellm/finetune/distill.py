"""Knowledge distillation: loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T).

The teacher (any model directory with the same vocabulary) runs on the fly on each micro-batch,
without gradients. Logits are formed chunk by chunk under activation checkpointing, so neither
model's full tokens x vocabulary logits stay in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mobilellm.errors import MobileLLMError
from mobilellm.train.loss import IGNORE_INDEX


class Distiller:
    """Not an nn.Module on purpose: the teacher's weights stay out of the student's optimizer,
    gradient sync and checkpoints."""

    def __init__(self, teacher, alpha: float = 0.5, temperature: float = 2.0, chunk_tokens: int = 4096):
        if not 0.0 <= alpha <= 1.0:
            raise MobileLLMError(f"distill.alpha must be within [0, 1], got {alpha}")
        if temperature <= 0:
            raise MobileLLMError(f"distill.temperature must be positive, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.chunk_tokens = alpha, temperature, chunk_tokens

    @classmethod
    def from_dir(cls, path: str, student_vocab: int, device, **kwargs) -> "Distiller":
        from mobilellm.checkpoint import load_model_dir

        teacher = load_model_dir(path, device=device)
        if teacher.config.vocab_size != student_vocab:
            raise MobileLLMError(f"teacher {path} has a {teacher.config.vocab_size}-token vocabulary, the student "
                                 f"{student_vocab}: distillation needs the same tokenizer")
        return cls(teacher, **kwargs)

    def _chunk(self, h, w, teacher_logits, t):
        logits = (h @ w.T).float()  # (c, V)
        valid = (t != IGNORE_INDEX).float()
        ce = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
        T = self.temperature
        student = F.log_softmax(logits / T, dim=-1)
        teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # (c,)
        return (1 - self.alpha) * ce, self.alpha * T * T * (kl * valid).sum()

    def losses(self, hidden, weight, inputs, targets, positions=None, attn_mask=None):
        """(cross-entropy, KL) terms, each summed over non-ignored targets / their count."""
        with torch.no_grad():
            t_hidden = self.teacher.hidden_states(inputs, positions=positions, attn_mask=attn_mask)
            t_weight = self.teacher.output_weight
        h, th = hidden.reshape(-1, hidden.shape[-1]), t_hidden.reshape(-1, t_hidden.shape[-1])
        t = targets.reshape(-1)
        n = (t != IGNORE_INDEX).sum().clamp(min=1)
        ce_sum = kl_sum = 0.0
        for s in range(0, h.shape[0], self.chunk_tokens):
            with torch.no_grad():
                t_logits = th[s:s + self.chunk_tokens] @ t_weight.T
            ce, kl = checkpoint(self._chunk, h[s:s + self.chunk_tokens], weight, t_logits, t[s:s + self.chunk_tokens],
                                use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        return ce_sum / n, kl_sum / n

    def __call__(self, hidden, weight, inputs, targets, positions=None, attn_mask=None):
        ce, kl = self.losses(hidden, weight, inputs, targets, positions, attn_mask)
        return ce + kl
