"""The on-device API-calling task of the MobileLLM paper, as a synthetic dataset and metrics.

The assistant answers with one API call on its first line, `set_alarm(time="6:30", label="gym")`, then
a short reply. The data is generated deterministically from a seed; test conversations never repeat a
training request. Metrics: exact match of the intent and of the structure, ROUGE-1 / ROUGE-L F1 of the reply."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import write_text_atomic

CITIES = ["Paris", "Tokyo", "Boston", "Berlin", "Lagos", "Lima", "Seoul", "Austin", "Madrid", "Oslo", "Denver", "Cairo"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "mom", "dad"]
ARTISTS = ["Miles Davis", "Adele", "Queen", "Bach", "Taylor Swift", "Daft Punk", "Nina Simone", "Coldplay"]
ROOMS = ["kitchen", "bedroom", "living room", "office", "garage", "bathroom"]
DAYS = ["today", "tomorrow", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["the airport", "the office", "Central Park", "the train station", "the nearest pharmacy", "home"]
EVENTS = ["dentist", "team meeting", "lunch with Sam", "yoga class", "parent conference", "car service"]
LABELS = ["gym", "work", "medicine", "school run", "flight"]
MESSAGES = ["I'm running late", "see you at eight", "can you call me back", "dinner is ready", "happy birthday"]
REMINDERS = ["buy milk", "pay the rent", "water the plants", "call the bank", "pick up the laundry"]


def _time(rng: random.Random) -> str:
    return f"{rng.randint(5, 11)}:{rng.choice(['00', '15', '30', '45'])}"


def _duration(rng: random.Random) -> str:
    return f"{rng.choice([5, 10, 15, 20, 25, 30, 45, 60, 90])} minutes"


# Each API: argument samplers, request phrasings, reply phrasings ({slot} filled from the arguments).
APIS = {
    "set_alarm": (
        {"time": _time, "label": lambda r: r.choice(LABELS)},
        ["Set an alarm for {time} called {label}", "Wake me up at {time}, label it {label}",
         "I need a {label} alarm at {time}", "Please set a {time} alarm named {label}"],
        ["Okay, your {label} alarm is set for {time}.", "Done. Alarm for {time} ({label}) is on."],
    ),
    "set_timer": (
        {"duration": _duration},
        ["Start a timer for {duration}", "Set a {duration} timer", "Time {duration} for me", "Countdown {duration}"],
        ["Timer set for {duration}.", "Your {duration} timer is running."],
    ),
    "send_message": (
        {"recipient": lambda r: r.choice(NAMES), "text": lambda r: r.choice(MESSAGES)},
        ["Text {recipient} that {text}", "Send {recipient} a message saying {text}", "Tell {recipient}: {text}",
         "Message {recipient} {text}"],
        ["Sent to {recipient}: \"{text}\".", "Your message to {recipient} is on its way."],
    ),
    "create_event": (
        {"title": lambda r: r.choice(EVENTS), "date": lambda r: r.choice(DAYS), "time": _time},
        ["Add {title} to my calendar on {date} at {time}", "Schedule {title} {date} at {time}",
         "Put {title} in my calendar for {date}, {time}", "Book {title} on {date} at {time}"],
        ["Added {title} on {date} at {time}.", "{title} is on your calendar for {date} at {time}."],
    ),
    "get_weather": (
        {"city": lambda r: r.choice(CITIES), "date": lambda r: r.choice(DAYS)},
        ["What's the weather in {city} {date}", "Will it rain in {city} {date}", "Weather for {city} {date}?",
         "How warm is it in {city} {date}"],
        ["Here is the forecast for {city} {date}.", "Checking the weather in {city} for {date}."],
    ),
    "play_music": (
        {"artist": lambda r: r.choice(ARTISTS)},
        ["Play some {artist}", "Put on {artist}", "I want to listen to {artist}", "Play music by {artist}"],
        ["Playing {artist}.", "Here's some {artist} for you."],
    ),
    "call_contact": (
        {"name": lambda r: r.choice(NAMES)},
        ["Call {name}", "Phone {name} please", "Ring {name}", "Can you call {name}"],
        ["Calling {name}.", "Dialing {name} now."],
    ),
    "add_reminder": (
        {"text": lambda r: r.choice(REMINDERS), "time": _time},
        ["Remind me to {text} at {time}", "At {time} remind me to {text}", "Set a reminder to {text} for {time}"],
        ["I'll remind you to {text} at {time}.", "Reminder set: {text} at {time}."],
    ),
    "navigate_to": (
        {"destination": lambda r: r.choice(PLACES)},
        ["Take me to {destination}", "Directions to {destination}", "Navigate to {destination}",
         "How do I get to {destination}"],
        ["Starting directions to {destination}.", "Route to {destination} is ready."],
    ),
    "turn_on_lights": (
        {"room": lambda r: r.choice(ROOMS)},
        ["Turn on the lights in the {room}", "Lights on in the {room}", "Switch on the {room} lights"],
        ["The {room} lights are on.", "Done, {room} lights on."],
    ),
}
SYSTEM = "You are an on-device assistant. Answer with one API call on the first line, then a short reply."


def format_call(name: str, args: dict) -> str:
    return f"{name}(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")"


_CALL = re.compile(r"^\s*(\w+)\((.*)\)\s*$")
_ARG = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def parse_response(text: str) -> tuple[str | None, dict, str]:
    """(api name, arguments, reply) from an assistant response; name None when the first line is no call."""
    first, _, rest = text.strip().partition("\n")
    m = _CALL.match(first)
    if not m:
        return None, {}, text.strip()
    return m.group(1), dict(_ARG.findall(m.group(2))), rest.strip()


def _turn(rng: random.Random) -> tuple[str, dict, str, str]:
    name = rng.choice(sorted(APIS))
    samplers, requests, replies = APIS[name]
    args = {k: f(rng) for k, f in samplers.items()}
    return name, args, rng.choice(requests).format(**args), rng.choice(replies).format(**args)


def generate(n: int, seed: int, multi_turn_fraction: float = 0.3) -> list[dict]:
    """n conversations; the last assistant turn of each is the one scored."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}]
        turns = 2 if rng.random() < multi_turn_fraction else 1
        for _ in range(turns):
            name, args, request, reply = _turn(rng)
            messages.append({"role": "user", "content": request})
            messages.append({"role": "assistant", "content": format_call(name, args) + "\n" + reply})
        out.append({"messages": messages, "api": {"name": name, "args": args}, "reply": reply})
    return out


def make_splits(train: int, test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint splits: a test conversation whose final request occurs in training is replaced."""
    train_set = generate(train, seed)
    seen = {c["messages"][-2]["content"] for c in train_set}
    test_set, k = [], 0
    while len(test_set) < test:
        batch = generate(test, seed + 1_000_003 + k)
        test_set += [c for c in batch if c["messages"][-2]["content"] not in seen][: test - len(test_set)]
        k += 1
        if k > 50:
            raise MobileLLMError("could not draw enough distinct test requests; ask for fewer")
    return train_set, test_set


def write_splits(out: str | Path, train: int, test: int, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out)
    tr, te = make_splits(train, test, seed)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, rows in zip(paths, (tr, te)):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def score(predictions: list[str], references: list[dict]) -> dict:
    """Exact match of intent and structure, ROUGE-1/ROUGE-L F1 of the reply (Google's rouge-score)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MobileLLMError("the api_calling metrics need rouge-score: pip install 'mobilellm[finetune]'") from None
    if len(predictions) != len(references) or not references:
        raise MobileLLMError("api_calling: need one prediction per reference, and at least one")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    intent = structure = r1 = rl = 0.0
    for pred, ref in zip(predictions, references):
        name, args, reply = parse_response(pred)
        intent += name == ref["api"]["name"]
        structure += name == ref["api"]["name"] and args == ref["api"]["args"]
        s = scorer.score(ref["reply"], reply)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = len(references)
    return {"em_intent": 100 * intent / n, "em_structure": 100 * structure / n, "rouge1": 100 * r1 / n,
            "rougeL": 100 * rl / n, "n": n}


def read_test(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MobileLLMError(f"api_calling test file {path} not found (make one with `mobilellm api-data`)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            raise MobileLLMError(f"{path} line {number} is not JSON (expected the api-data format)") from None
        if row is None:
            continue
        if not isinstance(row, dict) or not {"messages", "api", "reply"} <= set(row):
            raise MobileLLMError(f"{path} line {number}: every line needs messages, api and reply (the api-data "
                                 f"format)")
        rows.append(row)
    return rows


def predict(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, batch: int = 8) -> list[str]:
    """Greedy responses to each test conversation's last request."""
    from mobilellm.chat_template import DEFAULT_CHAT_TEMPLATE, apply_chat_template, special_text
    from mobilellm.inference import Engine, SamplingParams

    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    kwargs = {"bos_token": special_text(tokenizer, tokenizer.bos_id), "eos_token": special_text(tokenizer, tokenizer.eos_id)}
    prompts = [tokenizer.encode(apply_chat_template(r["messages"][:-1], template, True, **kwargs)) for r in rows]
    engine = Engine(model, tokenizer, max_batch=batch)
    return [o.text for o in engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))]


def evaluate(model, tokenizer, path: str | Path, limit: int | None = None, max_new_tokens: int = 64) -> dict:
    """Greedy responses to each test conversation's last request, scored against the reference."""
    rows = read_test(path)[:limit]
    predictions = predict(model, tokenizer, rows, max_new_tokens)
    result = score(predictions, rows)
    result["examples"] = [{"prompt": r["messages"][-2]["content"], "reference": r["messages"][-1]["content"],
                           "prediction": p} for r, p in zip(rows[:5], predictions[:5])]
    return result
