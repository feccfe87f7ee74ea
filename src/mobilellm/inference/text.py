"""Token ids -> text for streaming: incremental detokenization and stop strings."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, decoding a short window of recent tokens and
    emitting only once it no longer ends in U+FFFD (a multi-byte character split over byte-level tokens).
    `context` (the prompt's last tokens) lets SentencePiece keep a leading space on the first new word."""

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStrings:
    """Accumulates text; releases only what cannot be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.text = ""  # everything decoded so far (up to a stop string once found)
        self.released = 0  # chars of `text` handed out
        self.hit = False

    def push(self, delta: str) -> str:
        if self.hit:
            return ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += delta
        if self.stops:
            found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.hit = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.released:upto]
        self.released = max(self.released, upto)
        return out
