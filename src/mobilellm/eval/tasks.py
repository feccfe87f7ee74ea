"""Evaluation tasks: where each task's local file lives (docs/eval.md), how it is read, and the prompts.

Prompts follow lm-evaluation-harness 0.4.x task YAMLs, so a request here is the same (context,
continuation) pair lm-eval would score. Nothing is downloaded."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mobilellm.errors import MobileLLMError

PROMPT_VERSION = "lm-eval-0.4-zeroshot-v1"  # bump when any template below changes
TARGET_DELIMITER = " "  # lm-eval's default between context and each choice


@dataclass
class Example:
    """One multiple-choice (or single-continuation) document turned into scoring requests."""

    requests: list[tuple[str, str]]  # (context, continuation) per choice
    gold: int
    choices: list[str] = field(default_factory=list)  # choice texts, whose lengths acc_norm divides by


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # column header in the results table
    kind: str  # "choice" (acc[/acc_norm]), "lambada" (acc + ppl), "perplexity", "generation" (api_calling)
    files: tuple[str, ...]  # candidates under the data folder, first existing one wins
    metrics: tuple[str, ...]
    build: Callable[[dict], Example] | None = None
    file_format: str = ""


# ---- prompt construction, one function per task (the lm-eval template in the docstring) -------


def arc_example(doc: dict) -> Example:
    """arc_easy / arc_challenge: "Question: {{question}}\\nAnswer:" -> " {{choice}}"."""
    choices = list(doc["choices"]["text"])
    gold = list(doc["choices"]["label"]).index(doc["answerKey"])
    return _choice_example(f"Question: {doc['question']}\nAnswer:", choices, gold)


def boolq_example(doc: dict) -> Example:
    """boolq: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:" -> " no" | " yes"."""
    label = _boolq_label(doc)
    return _choice_example(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], label)


def piqa_example(doc: dict) -> Example:
    """piqa: "Question: {{goal}}\\nAnswer:" -> " {{sol1}}" | " {{sol2}}"."""
    return _choice_example(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def siqa_example(doc: dict) -> Example:
    """social_iqa: "Q: {{context}} {{question}}\\nA:" -> " {{answerA|B|C}}"."""
    choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
    correct = doc.get("correct", doc.get("label"))
    gold = {"A": 0, "B": 1, "C": 2, "1": 0, "2": 1, "3": 2}.get(str(correct).strip())
    if gold is None:
        raise ValueError(f"answer {correct!r} is not A/B/C")
    return _choice_example(f"Q: {doc['context']} {doc['question']}\nA:", choices, gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`."""
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow scrape
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def hellaswag_split_ctx(ctx: str) -> tuple[str, str]:
    """Recover (ctx_a, ctx_b) from ctx = ctx_a + " " + ctx_b (our file lacks the two fields).

    HellaSwag's ctx_b is the unfinished last sentence (the words the endings continue), so
    it is the text after the last sentence end; a ctx that ends a sentence has an empty ctx_b.
    """
    ctx = ctx.strip()
    if not ctx or ctx[-1] in ".!?\"'":
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx, ""  # no sentence boundary: cannot tell, keep the text as written
    cut = ends[-1].end()
    return ctx[:cut].rstrip(), ctx[cut:]


def hellaswag_doc_fields(doc: dict) -> dict:
    """Our JSONL row -> the HF `hellaswag` fields lm-eval's process_docs reads."""
    if "ctx_a" in doc:
        ctx_a, ctx_b = doc["ctx_a"], doc.get("ctx_b", "")
    else:
        ctx_a, ctx_b = hellaswag_split_ctx(doc["ctx"])
    return {"activity_label": doc["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b,
            "endings": list(doc["endings"]), "label": str(doc["label"])}


def hellaswag_example(doc: dict) -> Example:
    """hellaswag: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) -> " {{ending}}"."""
    f = hellaswag_doc_fields(doc)
    query = hellaswag_preprocess(f["activity_label"] + ": " + f["ctx_a"] + " " + f["ctx_b"].capitalize())
    choices = [hellaswag_preprocess(e) for e in f["endings"]]
    return _choice_example(query, choices, int(f["label"]))


def openbookqa_example(doc: dict) -> Example:
    """openbookqa: "{{question_stem}}" -> " {{choice}}"."""
    question = doc["question"]
    stem = question["stem"] if isinstance(question, dict) else doc["question_stem"]
    raw_choices = question["choices"] if isinstance(question, dict) else doc["choices"]
    if isinstance(raw_choices, dict):  # HF layout {"text": [...], "label": [...]}
        texts, labels = list(raw_choices["text"]), list(raw_choices["label"])
    else:  # release layout [{"text", "label"}, ...]
        texts, labels = [c["text"] for c in raw_choices], [c["label"] for c in raw_choices]
    return _choice_example(stem, texts, labels.index(doc["answerKey"].lstrip()))


def winogrande_example(doc: dict) -> Example:
    """winogrande, partial evaluation: context = sentence up to "_" + option, continuation = " " + rest."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    target = sentence[blank + 1:].strip()
    options = [doc["option1"], doc["option2"]]
    gold = {"1": 0, "2": 1}[str(doc["answer"]).strip()]
    contexts = [sentence[:blank] + option for option in options]
    return Example([(c, TARGET_DELIMITER + target) for c in contexts], gold, choices=[target, target])


def lambada_example(doc: dict) -> Example:
    """lambada_openai: context = text minus its last word, continuation = " " + last word."""
    if "text" in doc:
        words = doc["text"].split(" ")
        context, word = " ".join(words[:-1]), words[-1]
    else:
        context, word = doc["context"], doc["continuation"].strip()
    return Example([(context, " " + word)], 0, choices=[word])


def _choice_example(context: str, choices: list[str], gold: int) -> Example:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    return Example([(context, TARGET_DELIMITER + c) for c in choices], gold, choices=list(choices))


def _boolq_label(doc: dict) -> int:
    if "answer" in doc:
        answer = doc["answer"]
        if isinstance(answer, str):
            answer = {"true": True, "false": False}[answer.strip().lower()]
        return int(bool(answer))
    return int(doc["label"])


_ACC = ("acc",)
_ACC_NORM = ("acc", "acc_norm")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arc_easy", "ARC-e", "choice", ("arc_easy/test.jsonl",), _ACC_NORM, arc_example,
             '{"question", "choices": {"text": [...], "label": [...]}, "answerKey"}'),
        Task("arc_challenge", "ARC-c", "choice", ("arc_challenge/test.jsonl",), _ACC_NORM, arc_example,
             '{"question", "choices": {"text": [...], "label": [...]}, "answerKey"}'),
        Task("boolq", "BoolQ", "choice", ("boolq/dev.jsonl",), _ACC, boolq_example,
             '{"question", "passage", "answer": true|false}'),
        Task("piqa", "PIQA", "choice", ("piqa/validation.jsonl",), _ACC_NORM, piqa_example,
             '{"goal", "sol1", "sol2", "label": 0|1}'),
        Task("siqa", "SIQA", "choice", ("siqa/socialIQa_v1.4_dev.jsonl",), _ACC, siqa_example,
             '{"context", "question", "answerA", "answerB", "answerC", "correct": "A"|"B"|"C"}'),
        Task("hellaswag", "HellaSwag", "choice", ("hellaswag/validation.jsonl",), _ACC_NORM, hellaswag_example,
             '{"activity_label", "ctx", "endings": [4], "label": int}'),
        Task("openbookqa", "OBQA", "choice", ("openbookqa/test.jsonl",), _ACC_NORM, openbookqa_example,
             '{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}'),
        Task("winogrande", "WinoGrande", "choice", ("winogrande/validation.jsonl",), _ACC, winogrande_example,
             '{"sentence" (with one "_"), "option1", "option2", "answer": "1"|"2"}'),
        Task("lambada", "LAMBADA", "lambada",
             ("lambada_openai/lambada_openai_llmfoundry.jsonl", "lambada_openai/test.jsonl"),
             ("acc", "ppl"), lambada_example, '{"context", "continuation"} or {"text"}'),
        Task("wikitext2", "WikiText-2", "perplexity", ("wikitext2/raw/wiki.test.raw",), ("ppl",), None,
             "raw text, one paragraph per line"),
        Task("val", "val", "perplexity", (), ("loss", "ppl"), None, "prepared data manifest (--manifest)"),
        Task("api_calling", "API calling", "generation", ("api_calling/test.jsonl",),
             ("em_intent", "em_structure", "rouge1", "rougeL"), None,
             "`mobilellm api-data --out <data dir>/api_calling` (messages, api, reply)"),
    )
}
ZERO_SHOT = ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "openbookqa", "winogrande")
ALIASES = {"paper": ZERO_SHOT, "all": ZERO_SHOT + ("lambada", "wikitext2"), "lambada_openai": ("lambada",),
           "social_iqa": ("siqa",)}


def resolve_task_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """"arc_easy,piqa" or ["paper"] -> known task names, in the given order, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    names: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        expanded = ALIASES.get(item, (item,))
        for name in expanded:
            if name not in TASKS:
                raise MobileLLMError(f"unknown task {name!r}; choose from {', '.join(TASKS)} "
                                     "(or 'paper' for the eight zero-shot tasks)")
            if name not in names:
                names.append(name)
    if not names:
        raise MobileLLMError("no tasks given; pass --tasks, e.g. --tasks paper or --tasks arc_easy,wikitext2")
    return names


def task_file(task: Task, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise MobileLLMError(f"task {task.name} needs local data: pass --data-dir <eval data folder> "
                             "(see docs/eval.md)")
    root = Path(data_dir)
    if not root.is_dir():
        raise MobileLLMError(f"eval data folder {root} does not exist; pass --data-dir <folder with the task files>")
    for rel in task.files:
        if (root / rel).is_file():
            return root / rel
    raise MobileLLMError(f"task {task.name}: {root / task.files[0]} not found; "
                         "put the file there (format in docs/eval.md)")


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    docs: list[dict] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                raise MobileLLMError(f"{path}:{lineno} is not valid JSON ({err.msg}); "
                                     "expected one JSON object per line")
            if not isinstance(doc, dict):
                raise MobileLLMError(f"{path}:{lineno} is not a JSON object; expected one object per line")
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
    return docs


def load_examples(name: str, data_dir: str | Path | None, limit: int | None = None) -> list[Example]:
    """The first `limit` documents of a choice/lambada task as scoring requests (lm-eval's --limit)."""
    task = TASKS[name]
    path = task_file(task, data_dir)
    examples = []
    for i, doc in enumerate(read_jsonl(path, limit), 1):
        try:
            examples.append(task.build(doc))
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise MobileLLMError(f"{path}: record {i} is not in the {name} format ({detail}); "
                                 f"expected {task.file_format}")
    if not examples:
        raise MobileLLMError(f"{path} holds no records")
    return examples


def read_wikitext(data_dir: str | Path | None) -> str:
    """WikiText-2 test text the reference way: paragraphs joined with "\\n\\n"."""
    path = task_file(TASKS["wikitext2"], data_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MobileLLMError(f"{path} is not UTF-8 text; expected the raw WikiText-2 test file") from None
    # One paragraph per line, each keeping its "\n" like the HF dataset's rows; CRLF copies normalised.
    rows = raw.replace("\r\n", "\n").splitlines(keepends=True)
    if not rows:
        raise MobileLLMError(f"{path} is empty")
    return "\n\n".join(rows)
