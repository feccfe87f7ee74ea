"""Run checkpoints: a model directory plus everything needed to continue exactly.

    <run dir>/checkpoints/step-00000100/{model/, trainer_state.json, trainer_state.safetensors}
    <run dir>/final/                the model directory of the last step

Neither file can carry code: loading one never runs anything from the checkpoint (docs/security.md).
Older pickled checkpoints (`trainer_state.pt`) are refused; `mobilellm convert-state` rewrites them with
torch's restricted unpickler. Checkpoints are built under a temporary name and renamed into place, so a
crash mid-save leaves the previous ones intact."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import WriteError, atomic_dir, atomic_path

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE, TENSORS_FILE, LEGACY_FILE = "trainer_state.json", "trainer_state.safetensors", "trainer_state.pt"
FORMAT, VERSION = "mobilellm-trainer-state", 1


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (either format), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and is_checkpoint(p) and (p / "model" / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or (path / LEGACY_FILE).is_file()


def remove_partial_saves(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():  # temporary dirs of an interrupted save
                shutil.rmtree(p, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of this run, if any; a path: that checkpoint; none: fresh."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not is_checkpoint(path):
        raise MobileLLMError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_id_of(checkpoint: Path) -> str | None:
    """The id of the run that wrote `checkpoint` (None for old-format or unreadable ones)."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["state"].get("run_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, write_model, trainer_state: dict, keep_last: int, milestone_every: int,
         keep_steps=()) -> Path:
    """Write checkpoint `step` atomically, then prune this run's old ones (keep-last-N plus milestones).

    write_model(directory) writes the model directory into the given folder. Checkpoints of other
    runs (another `run_id`, or the old format) are never pruned.
    """
    target = run_dir / "checkpoints" / f"step-{step:08d}"
    try:
        with atomic_dir(target) as tmp:
            write_model(tmp / "model")
            write_trainer_state(tmp, trainer_state)
    except WriteError as err:
        note = "earlier checkpoints are intact" if checkpoints(run_dir) else "no checkpoint was saved yet"
        raise WriteError(target, err.reason, note) from None
    ours = [(s, p) for s, p in checkpoints(run_dir) if run_id_of(p) == trainer_state["run_id"]]
    recent = {s for s, _ in ours[-keep_last:]} if keep_last > 0 else set()
    for s, path in ours:
        milestone = (milestone_every > 0 and s % milestone_every == 0) or s in keep_steps
        if s not in recent and not milestone:
            shutil.rmtree(path, ignore_errors=True)
    return target


# ---- the format: nested dicts/lists/tuples of plain values, tensors stored beside them ---------------

_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def write_trainer_state(directory: Path, state: dict) -> None:
    """trainer_state.safetensors (tensors) then trainer_state.json (everything else; written last)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, {})
    with atomic_path(directory / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    with atomic_path(directory / STATE_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "state": encoded}), encoding="utf-8")


def load_trainer_state(checkpoint: Path) -> dict:
    if not (checkpoint / STATE_FILE).is_file() and (checkpoint / LEGACY_FILE).is_file():
        raise MobileLLMError(f"{checkpoint} keeps its trainer state in a pickle ({LEGACY_FILE}, older mobilellm), "
                             f"which could run code when loaded, so it is not read; convert it without running "
                             f"code: mobilellm convert-state {checkpoint}")
    from safetensors.torch import load_file

    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{STATE_FILE} is not a mobilellm trainer state")
        if saved.get("version") != VERSION:
            raise ValueError(f"trainer state version {saved.get('version')}, this mobilellm reads {VERSION}")
        return _decode(saved["state"], load_file(checkpoint / TENSORS_FILE))
    except Exception as err:  # JSON, safetensors and structure errors alike: the files are damaged
        raise MobileLLMError(f"checkpoint {checkpoint} is corrupt ({type(err).__name__}: {_first_line(err)})") from None


def _encode(obj, tensors: dict, seen: dict):
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:  # the same tensor twice is stored once
            t = obj.detach().cpu()
            if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.contiguous().clone()  # a view: safetensors stores whole, unshared buffers
            seen[id(obj)] = name = str(len(tensors))
            tensors[name] = t
        return {_TENSOR: seen[id(obj)]}
    if isinstance(obj, np.ndarray):  # numpy's RNG key
        return {_ARRAY: obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"internal error: the trainer state holds a {type(obj).__name__}, which checkpoints do not store")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"array of dtype {dtype}")
        return np.asarray(obj[_ARRAY], dtype=dtype)
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def convert_legacy(checkpoint: Path) -> Path:
    """Rewrite an old-format checkpoint's trainer_state.pt as trainer_state.json + .safetensors.

    The pickle is read with torch's weights-only unpickler (tensors and plain values, plus numpy's array
    and dtype for its RNG state); a file that needs anything more is not a trainer state we wrote.
    """
    file = checkpoint / LEGACY_FILE
    if not file.is_file():
        what = "already converted" if (checkpoint / STATE_FILE).is_file() else "not a checkpoint"
        raise MobileLLMError(f"{checkpoint}: no {LEGACY_FILE} ({what})")
    allowed = _numpy_globals()
    try:  # read the pickle's opcodes (nothing runs) for what it would import
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        unsafe -= {f"{g.__module__}.{g.__name__}" for g in allowed}
        if not unsafe:
            with torch.serialization.safe_globals(allowed):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            unsafe = set(re.findall(r"GLOBAL (\S+)", str(err)))
        else:
            raise MobileLLMError(f"{file} is corrupt ({type(err).__name__}: {_first_line(err)})") from None
    if unsafe:
        raise MobileLLMError(f"{file} refers to {', '.join(sorted(unsafe)[:3])}: more than tensors and plain values, "
                             f"so loading it could run code; not converted")
    if not isinstance(state, dict) or not {"step", "optimizer", "data", "rng"} <= set(state):
        raise MobileLLMError(f"{file} is not a mobilellm trainer state")
    write_trainer_state(checkpoint, state)
    file.unlink()
    return checkpoint


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
