"""`mobilellm convert-state <checkpoint or run dir>`: rewrite old-format trainer states.

Checkpoints of earlier versions keep the trainer state in a pickle (`trainer_state.pt`), which
training refuses to load because a pickle can run code. This reads each one with torch's
restricted unpickler (tensors and plain values only, so nothing in the file runs) and writes the
current format (`trainer_state.json` + `trainer_state.safetensors`) beside the model.
"""

from __future__ import annotations

from pathlib import Path

from mobilellm.errors import MobileLLMError


def run(args) -> int:
    from mobilellm.train import state

    converted = 0
    for given in args.paths:
        path = Path(given)
        if (path / state.LEGACY_FILE).is_file():
            targets = [path]
        else:  # a run folder: every old-format checkpoint in it
            targets = [p for _, p in state.checkpoints(path) if (p / state.LEGACY_FILE).is_file()]
            if not targets:
                raise MobileLLMError(f"{path}: no {state.LEGACY_FILE} there, nor in checkpoints/step-*/ below it")
        for checkpoint in targets:
            state.convert_legacy(checkpoint)
            print(f"converted {checkpoint}")
            converted += 1
    print(f"{converted} checkpoint(s) converted; resume them with mobilellm train --resume <checkpoint> (or auto)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert-state", help="convert checkpoints of older versions (trainer_state.pt) to the "
                                             "current format, without running code from them",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("paths", nargs="+", metavar="PATH", help="a checkpoint folder (step-NNNNNNNN) or a run folder")
    p.set_defaults(func=run)
