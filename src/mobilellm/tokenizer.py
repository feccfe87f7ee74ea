"""Tokenizers: train a byte-level BPE, or load a `tokenizer.json` / SentencePiece `tokenizer.model`,
behind one small interface that data preparation, training, evaluation and generation share.

`HFTokenizer` wraps Hugging Face `tokenizers`; `SentencePieceTokenizer` wraps `sentencepiece` (ids are
plain `sp.encode(text)`, which transformers' `PreTrainedTokenizerFast` reproduces on a directory we save;
its `LlamaTokenizer` class differs on leading and repeated spaces, so `save()` never names it).
`encode` recognises special tokens in the text, as transformers does, so rendered chat templates work;
`parse_special=False` spells them out as ordinary text, which is what data preparation wants (a literal
"</s>" in a web page is not an EOS)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from mobilellm.chat_template import ROLES, default_chat_template, role_token
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_path, read_json_object, write_json_atomic, write_text_atomic

DEFAULT_BOS = "<s>"
DEFAULT_EOS = "</s>"
DEFAULT_PAD = "<pad>"
DEFAULT_ROLES = ROLES  # role r gets the special token "<|r|>"

# Names that mean BOS / EOS in tokenizer.json files that come without a tokenizer_config.json.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """The interface every stage codes against. Subclasses set the attributes in __init__."""

    kind: str  # "bpe" (tokenizer.json) or "sentencepiece" (tokenizer.model)
    file_name: str  # canonical file name in a model directory
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool  # documents and prompts start with BOS
    chat_template: str | None
    model_max_length: int | None
    config: dict[str, Any]  # tokenizer_config.json as loaded (unknown keys are kept on save)
    # Threads for encode_batch where the backend takes a count (sentencepiece); -1: all cores.
    # `tokenizers` uses its own pool (TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS decide).
    threads: int = -1

    def _encode_plain(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False, *, parse_special: bool = True) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos, parse_special=parse_special)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False, *,
                     parse_special: bool = True) -> list[list[int]]:
        """Encode many texts (in parallel inside the backend); `bos`/`eos` add those ids around each."""
        head = [self._require("bos")] if bos else []
        tail = [self._require("eos")] if eos else []
        out = self._encode_plain(list(texts), parse_special)
        if head or tail:
            out = [head + ids + tail for ids in out]
        return out

    def encode_arrays(self, texts: Sequence[str], *, parse_special: bool = True) -> list:
        """Like encode_batch (no BOS/EOS), as numpy int arrays: cheaper than lists for bulk work."""
        import numpy as np

        return [np.asarray(ids, dtype=np.int64) for ids in self._encode_plain(list(texts), parse_special)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    def canonical_bytes(self) -> bytes:
        """The bytes the fingerprint hashes: the tokenizer file as `save()` writes it (canonical JSON for BPE)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer file content; equal for a tokenizer and its saved copy."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = hashlib.sha256(self.canonical_bytes()).hexdigest()
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer file plus tokenizer_config.json, loadable by transformers.AutoTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_file(directory / self.file_name)
        write_json_atomic(directory / "tokenizer_config.json", self.hf_config())

    def _save_file(self, path: Path) -> None:
        raise NotImplementedError

    def hf_config(self) -> dict[str, Any]:
        """tokenizer_config.json: the loaded config with our special tokens and flags written over it."""
        cfg = {k: v for k, v in self.config.items() if k not in ("added_tokens_decoder", "tokenizer_class")}
        # "PreTrainedTokenizerFast" loads either file in transformers 5.x (a tokenizer.model is converted);
        # for tokenizer.model it matches sentencepiece ids where "LlamaTokenizer" would not (module doc).
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for name in ("bos", "eos", "pad", "unk"):
            token_id = getattr(self, f"{name}_id")
            cfg[f"{name}_token"] = None if token_id is None else self.id_to_token(token_id)
        cfg["add_bos_token"] = self.add_bos
        cfg["add_eos_token"] = False
        cfg.setdefault("clean_up_tokenization_spaces", False)
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        else:
            cfg.pop("model_max_length", None)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    def describe(self) -> str:
        def tok(i):
            return "none" if i is None else f"{self.id_to_token(i)!r}={i}"

        return (f"{self.kind} tokenizer, vocab {self.vocab_size}, bos {tok(self.bos_id)}, eos {tok(self.eos_id)}, "
                f"pad {tok(self.pad_id)}, add_bos {self.add_bos}, fingerprint {self.fingerprint()[:12]}")

    def _require(self, name: str) -> int:
        token_id = getattr(self, f"{name}_id")
        if token_id is None:
            raise MobileLLMError(f"this tokenizer has no {name.upper()} token; add one (e.g. `--{name}` when training) "
                                 f"or use a tokenizer that defines it")
        return token_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


class HFTokenizer(Tokenizer):
    kind = "bpe"
    file_name = "tokenizer.json"

    def __init__(self, tk, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self._tk = tk
        # A copy that spells special tokens out as text (encode_special_tokens=True), for parse_special=False.
        self._tk_literal = None
        self.config = dict(config or {})
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        data = json.loads(tk.to_str())
        specials = [t.content for t in tk.get_added_tokens_decoder().values() if t.special]
        self.bos_id = self._special_id("bos_token", specials, _BOS_NAMES)
        self.eos_id = self._special_id("eos_token", specials, _EOS_NAMES)
        self.pad_id = self._special_id("pad_token", specials, _PAD_NAMES)
        model_unk = (data.get("model") or {}).get("unk_token")
        self.unk_id = self._special_id("unk_token", [model_unk] if model_unk else [], [model_unk] if model_unk else [])
        self.add_bos = bool(self.config.get("add_bos_token", self._post_processor_adds_bos(data)))
        self.chat_template = chat_template if chat_template is not None else _config_chat_template(self.config)
        self.model_max_length = _max_length(self.config)

    def _special_id(self, key: str, specials: list[str], guesses: Sequence[str]) -> int | None:
        if key in self.config:  # the config is authoritative, including an explicit null
            name = _token_content(self.config[key])
            if name is None:
                return None
            token_id = self._tk.token_to_id(name)
            if token_id is None:
                raise MobileLLMError(f"tokenizer_config.json names {key} {name!r}, which is not in the vocabulary; "
                                     f"fix the config or remove the key")
            return token_id
        for name in guesses:
            if name in specials:
                return self._tk.token_to_id(name)
        return None

    def _post_processor_adds_bos(self, data: dict) -> bool:
        # A TemplateProcessing post-processor whose single template starts with the BOS token, as
        # LLaMA-style tokenizer.json files (and ours) carry it.
        if self.bos_id is None:
            return False
        proc = data.get("post_processor") or {}
        procs = proc.get("processors", [proc]) if proc.get("type") == "Sequence" else [proc]
        for p in procs:
            if p.get("type") == "TemplateProcessing" and p.get("single"):
                first = p["single"][0]
                return "SpecialToken" in first and first["SpecialToken"]["id"] == self.id_to_token(self.bos_id)
        return False

    def _encode_plain(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        tk = self._tk
        if not parse_special:
            if self._tk_literal is None:
                from tokenizers import Tokenizer as _Tk

                self._tk_literal = _Tk.from_str(self._tk.to_str())
                self._tk_literal.encode_special_tokens = True
            tk = self._tk_literal
        # encode_batch_fast skips the character offsets, which we never use (faster than encode()).
        return [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def canonical_bytes(self) -> bytes:
        # Sorted compact JSON of the backend's own serialisation: independent of how the file was
        # formatted, identical after save() and load_tokenizer().
        data = json.loads(self._tk.to_str())
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def _save_file(self, path: Path) -> None:
        write_text_atomic(path, self._tk.to_str(pretty=True))

    def __getstate__(self):  # picklable (worker processes); the JSON string rebuilds the backend
        return {"json": self._tk.to_str(), "config": self.config, "chat_template": self.chat_template}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as _Tk

        self.__init__(_Tk.from_str(state["json"]), state["config"], state["chat_template"])


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, model_bytes: bytes, config: dict[str, Any] | None = None, chat_template: str | None = None):
        import sentencepiece as spm

        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.config = dict(config or {})
        self.vocab_size = self._sp.get_piece_size()

        def sp_id(i: int) -> int | None:
            return None if i < 0 else i

        self.bos_id = sp_id(self._sp.bos_id())
        self.eos_id = sp_id(self._sp.eos_id())
        self.pad_id = sp_id(self._sp.pad_id())
        self.unk_id = sp_id(self._sp.unk_id())
        if self.pad_id is None and self.config.get("pad_token") is not None:  # LLaMA has no pad piece
            self.pad_id = self.token_to_id(_token_content(self.config["pad_token"]))
        # LLaMA convention: every document starts with BOS, unless the config says otherwise.
        self.add_bos = bool(self.config.get("add_bos_token", self.bos_id is not None))
        self.chat_template = chat_template if chat_template is not None else _config_chat_template(self.config)
        self.model_max_length = _max_length(self.config)
        # control pieces (<s>, </s>) and <unk>, as text: what a rendered chat template contains
        self._specials = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                          if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(self._specials, key=len,
                                                                              reverse=True))) + ")")

    def _encode_plain(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        # sp.encode adds its dummy-prefix space itself and never parses "</s>" in the text: with
        # parse_special, special-token strings are split out first and each piece between them is
        # encoded on its own, which is what transformers' (legacy) LLaMA tokenizer does.
        if parse_special and any(s in t for t in texts for s in self._specials):
            return [self._encode_with_specials(t) for t in texts]
        if len(texts) == 1:
            return [self._sp.encode(texts[0])]
        return self._sp.encode(texts, num_threads=self.threads)

    def _encode_with_specials(self, text: str) -> list[int]:
        ids = []
        for piece in self._special_split.split(text):
            if piece in self._specials:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        return ids

    def encode_arrays(self, texts: Sequence[str], *, parse_special: bool = True) -> list:
        # sentencepiece fills numpy buffers directly, without building Python int lists.
        return self._sp.encode(list(texts), return_type="numpy", num_threads=self.threads)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = list(ids)
        if skip_special:
            return self._sp.decode(ids)  # control pieces (<s>, </s>) decode to nothing
        parts, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token is None:
            return None
        token_id = self._sp.piece_to_id(token)
        # sentencepiece answers unk_id for unknown pieces.
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._sp.id_to_piece(token_id)

    def canonical_bytes(self) -> bytes:
        return self._model_bytes

    def _save_file(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(self._model_bytes)

    def __getstate__(self):
        return {"model": self._model_bytes, "config": self.config, "chat_template": self.chat_template}

    def __setstate__(self, state):
        self.__init__(state["model"], state["config"], state["chat_template"])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json or tokenizer.model file, or a directory holding one (tokenizer.json preferred).

    A tokenizer_config.json (and chat_template.jinja) beside the file supplies special tokens,
    add_bos_token, model_max_length and the chat template.
    """
    path = Path(path)
    if not path.exists():
        raise MobileLLMError(f"tokenizer not found: {path}; pass a tokenizer.json / tokenizer.model file or a "
                             f"directory holding one (train one with `mobilellm tokenizer train`)")
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise MobileLLMError(f"no tokenizer.json or tokenizer.model in {path}; pass the tokenizer file or the "
                                 f"directory that holds it")
        file = found[0]
    else:
        file = path
    config = _read_config(file.parent)
    template_file = file.parent / "chat_template.jinja"  # transformers 5 saves the template separately
    chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if file.suffix == ".json":
        from tokenizers import Tokenizer as _Tk

        try:
            tk = _Tk.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exception subclasses
            raise MobileLLMError(f"cannot load tokenizer {file}: {_one_line(err)}; is it a Hugging Face "
                                 f"tokenizer.json?") from None
        return HFTokenizer(tk, config, chat_template)
    if file.suffix == ".model":
        data = file.read_bytes()
        try:
            return SentencePieceTokenizer(data, config, chat_template)
        except (RuntimeError, OSError) as err:
            raise MobileLLMError(f"cannot load tokenizer {file}: {_one_line(err)}; is it a SentencePiece "
                                 f"model?") from None
    raise MobileLLMError(f"unsupported tokenizer file {file}: expected tokenizer.json (Hugging Face) or "
                         f"tokenizer.model (SentencePiece)")


def _read_config(directory: Path) -> dict[str, Any]:
    cfg_file = directory / "tokenizer_config.json"
    if not cfg_file.is_file():
        return {}
    return read_json_object(cfg_file, "fix or delete it")


def _token_content(value: Any) -> str | None:
    # transformers writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _config_chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


def _max_length(config: dict[str, Any]) -> int | None:
    value = config.get("model_max_length")
    # transformers uses a huge sentinel (int(1e30)) for "unknown".
    return value if isinstance(value, int) and value < 10**9 else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# what a trained tokenizer consists of (and a model directory carries besides its weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, bos: str | None = DEFAULT_BOS,
                    eos: str | None = DEFAULT_EOS, pad: str | None = DEFAULT_PAD, roles: Sequence[str] = DEFAULT_ROLES,
                    extra_special: Sequence[str] = (), add_bos: bool = True, min_frequency: int = 2,
                    chat_template: str | None = "default", show_progress: bool = False) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with Hugging Face `tokenizers`.

    Special tokens get the lowest ids (pad, bos, eos, `<|role|>` per role, extra: the defaults give
    pad=0, bos=1, eos=2, as ModelConfig assumes); every byte has a token, so no UNK is needed.
    """
    from tokenizers import Tokenizer as _Tk
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = [t for t in (pad, bos, eos) if t] + [role_token(r) for r in roles] + list(extra_special)
    if len(set(specials)) != len(specials):
        raise MobileLLMError(f"special tokens must be distinct, got {specials}")
    if eos is None:
        raise MobileLLMError("an EOS token is required: data preparation separates documents with it")
    if add_bos and bos is None:
        raise MobileLLMError("add_bos needs a BOS token; pass a BOS name or add_bos=False")
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise MobileLLMError(f"vocab size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
                             f"{len(specials)} special tokens; use at least {minimum} (typical: 32000)")

    tk = _Tk(models.BPE())
    # GPT-2's exact regex split and byte mapping, no normaliser: what llama.cpp's "gpt2" pre-tokenizer does.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    seen = 0

    def counted(it: Iterable[str]):
        nonlocal seen
        for text in it:
            seen += 1
            yield text

    tk.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise MobileLLMError("no training text: the inputs held no documents")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": None}
    template = default_chat_template(add_bos) if chat_template == "default" and roles else chat_template
    return HFTokenizer(tk, {**config, "add_bos_token": add_bos}, template)
