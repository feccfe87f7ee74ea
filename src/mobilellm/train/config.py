"""TrainConfig: typed sections that YAML files and `--section.key value` overrides map onto.

Defaults follow the paper's recipe (docs/paper.md, "Training recipe"): AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1
not on norms, grad-clip 1.0, linear warmup then cosine to 0.1x peak, peak LR 2e-3 at
1024 x 2048 tokens per step scaled linearly with the global batch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mobilellm.config import ModelConfig, get_preset
from mobilellm.errors import MobileLLMError

PAPER_LR = 2e-3
PAPER_BATCH_TOKENS = 1024 * 2048


@dataclass
class ModelSection:
    preset: str | None = "mobilellm-125m"  # a named preset, overridden field by field below
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {vocab_size: 4096}
    init_from: str | None = None  # a model directory to start from instead of random weights


@dataclass
class DataSection:
    train: list = field(default_factory=list)  # prepared dataset dirs (manifest.json); several are concatenated
    val: str | None = None  # dir whose "val" split is used; default: the first train dir
    seq_len: int = 2048
    num_workers: int = 0


@dataclass
class BatchSection:
    micro_batch: int = 8  # sequences per rank per forward
    grad_accum: int | None = None  # None: derived from global_batch_tokens
    global_batch_tokens: int | None = None  # None: micro_batch * seq_len * world * grad_accum(=1)


@dataclass
class OptimSection:
    lr: float | None = None  # None: 2e-3 scaled linearly with the global batch (paper)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # weight decay on the (shared) embedding matrix
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # "cosine" (paper), "wsd" (warmup-stable-decay) or "linear" (fine-tuning)
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # floor of the decay, as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: last fraction of the steps decays linearly to the floor


@dataclass
class RunSection:
    out_dir: str = "runs/train"
    max_steps: int | None = None
    max_tokens: int | None = None  # alternative to max_steps
    epochs: float | None = None  # for finite (fine-tuning) data when max_steps/max_tokens are unset
    time_limit_minutes: float | None = None  # stop early (and save) when this much wall time has passed
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool | None = None  # None: on for GPU
    activation_checkpointing: bool = False
    fp32_residual: bool = False  # under bf16, keep the residual stream in fp32 (default: bf16, less traffic)
    loss_chunk_tokens: int = 8192  # fused linear + cross-entropy chunk (never materialises all logits)
    distributed: str = "ddp"  # ddp | fsdp | hsdp (used under torchrun)
    hsdp_shard_size: int | None = None  # hsdp: processes per shard group (None: the processes of one node)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    milestone_every: int = 0  # checkpoints kept forever every N steps (0: none)
    keep_steps: list = field(default_factory=list)  # steps also saved and kept forever (study decay branches)
    max_bad_steps: int = 5  # consecutive non-finite losses skipped before stopping
    tensorboard: bool = True
    peak_tflops: float | None = None  # for MFU; None: measured on GPU at start


@dataclass
class DistillSection:
    teacher: str | None = None  # a model directory with the same vocabulary; None: no distillation
    alpha: float = 0.5  # weight of the KL term; 1 - alpha on the cross-entropy
    temperature: float = 2.0
    cache_dir: str | None = None  # fine-tuning: teacher logits on disk, computed once per row (None: no cache)
    cache_top_k: int = 0  # 0: cache every logit; k > 0: only the teacher's k largest per position


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def model_config(self) -> ModelConfig:
        if self.model.preset:
            return get_preset(self.model.preset, **self.model.overrides)
        return ModelConfig.from_dict(self.model.overrides)

    def validate(self) -> None:
        if self.schedule.kind not in ("cosine", "wsd", "linear"):
            raise MobileLLMError(f"schedule.kind must be cosine, wsd or linear, got {self.schedule.kind!r}")
        if self.run.distributed not in ("ddp", "fsdp", "hsdp"):
            raise MobileLLMError(f"run.distributed must be ddp, fsdp or hsdp, got {self.run.distributed!r}")
        if self.run.precision not in ("auto", "fp32", "bf16"):
            raise MobileLLMError(f"run.precision must be auto, fp32 or bf16, got {self.run.precision!r}")
        if self.run.max_steps is None and self.run.max_tokens is None and self.run.epochs is None:
            raise MobileLLMError("set run.max_steps, run.max_tokens or run.epochs")
        keep = self.run.keep_steps
        if not isinstance(keep, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in keep):
            raise MobileLLMError(f"run.keep_steps must be a list of positive step numbers, got {keep!r}")
        if not self.data.train:
            raise MobileLLMError("data.train is empty: give one or more prepared dataset directories (mobilellm prepare)")
        for key, value, ok, rule in self._ranges():
            if value is not None and not ok(value):
                raise MobileLLMError(f"{key} must be {rule}, got {value!r}")
        if len(self.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.optim.betas):
            raise MobileLLMError(f"optim.betas must be two numbers within [0, 1), got {list(self.optim.betas)!r}")
        if self.distill.cache_dir and not self.distill.teacher:
            raise MobileLLMError("distill.cache_dir caches a teacher's logits: set distill.teacher too")
        if self.distill.cache_top_k < 0:
            raise MobileLLMError(f"distill.cache_top_k must be 0 (whole vocabulary) or positive, "
                                 f"got {self.distill.cache_top_k}")

    def _ranges(self):
        """(key, value, test, rule) for every number with a limited range (None values are unset: skipped)."""
        positive, at_least_0, at_least_1 = (lambda v: v > 0, "positive"), (lambda v: v >= 0, ">= 0"), (
            lambda v: v >= 1, ">= 1")
        unit = (lambda v: 0 <= v <= 1, "within [0, 1]")
        d, b, o, s, r, k = self.data, self.batch, self.optim, self.schedule, self.run, self.distill
        checks = [
            ("data.seq_len", d.seq_len, positive), ("data.num_workers", d.num_workers, at_least_0),
            ("batch.micro_batch", b.micro_batch, positive), ("batch.grad_accum", b.grad_accum, positive),
            ("batch.global_batch_tokens", b.global_batch_tokens, positive),
            ("optim.lr", o.lr, positive), ("optim.eps", o.eps, positive),
            ("optim.weight_decay", o.weight_decay, at_least_0), ("optim.grad_clip", o.grad_clip, at_least_0),
            ("schedule.warmup_steps", s.warmup_steps, at_least_0), ("schedule.min_lr_ratio", s.min_lr_ratio, unit),
            ("schedule.decay_fraction", s.decay_fraction, unit),
            ("run.max_steps", r.max_steps, positive), ("run.max_tokens", r.max_tokens, positive),
            ("run.epochs", r.epochs, positive), ("run.time_limit_minutes", r.time_limit_minutes, positive),
            ("run.seed", r.seed, (lambda v: 0 <= v < 2**63, "within [0, 2**63)")),
            ("run.loss_chunk_tokens", r.loss_chunk_tokens, positive), ("run.log_every", r.log_every, positive),
            ("run.eval_every", r.eval_every, at_least_0), ("run.eval_batches", r.eval_batches, at_least_0),
            ("run.save_every", r.save_every, at_least_0), ("run.keep_last", r.keep_last, at_least_1),
            ("run.milestone_every", r.milestone_every, at_least_0),
            ("run.max_bad_steps", r.max_bad_steps, at_least_0), ("run.peak_tflops", r.peak_tflops, positive),
            ("run.hsdp_shard_size", r.hsdp_shard_size, positive),
            ("distill.alpha", k.alpha, unit), ("distill.temperature", k.temperature, positive),
        ]
        # `v > 0` is False for NaN, so NaN fails every test; infinity is no setting either
        return [(key, value, lambda v, ok=ok: ok(v) and v != float("inf"), rule) for key, value, (ok, rule) in checks]

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(grad_accum, global batch in sequences), checking that the split is possible."""
        per_step = self.batch.micro_batch * world_size
        if self.batch.global_batch_tokens is not None:
            global_seqs, rem = divmod(self.batch.global_batch_tokens, self.data.seq_len)
            if rem or global_seqs % per_step:
                raise MobileLLMError(f"batch.global_batch_tokens={self.batch.global_batch_tokens} is not a multiple "
                                     f"of micro_batch x seq_len x world_size = {self.batch.micro_batch} x "
                                     f"{self.data.seq_len} x {world_size}")
            accum = global_seqs // per_step
            if self.batch.grad_accum is not None and self.batch.grad_accum != accum:
                raise MobileLLMError(f"batch.grad_accum={self.batch.grad_accum} contradicts global_batch_tokens "
                                     f"(needs {accum})")
            return accum, global_seqs
        accum = self.batch.grad_accum or 1
        if accum <= 0:
            raise MobileLLMError("batch.grad_accum must be positive")
        return accum, per_step * accum

    def peak_lr(self, global_tokens: int) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return PAPER_LR * global_tokens / PAPER_BATCH_TOKENS


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _coerce(value, hint, where: str):
    """Coerce YAML/CLI values onto the field's type (strings from the command line included)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, str) and hint is not str:
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        value = yaml.safe_load(value)
    if value is None:
        if type(None) in args:
            return None
        raise MobileLLMError(f"{where} cannot be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except MobileLLMError:
                continue
        raise MobileLLMError(f"{where}: {value!r} is not a valid {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise MobileLLMError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MobileLLMError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML reads "3e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise MobileLLMError(f"{where} must be a number, got {value!r}")
    if hint is str:
        return str(value)
    if hint is list or origin is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MobileLLMError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise MobileLLMError(f"{where} must be a mapping, got {value!r}")
        return value
    return value


def from_dict(data: dict) -> TrainConfig:
    cfg = TrainConfig()
    if not isinstance(data, dict):
        raise MobileLLMError("training config must be a mapping of sections")
    for section, values in data.items():
        if section not in SECTIONS:
            raise MobileLLMError(f"unknown config section {section!r}; sections are {sorted(SECTIONS)}")
        for key, value in (values or {}).items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def set_value(cfg: TrainConfig, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise MobileLLMError(f"unknown config key {dotted!r}; use <section>.<key> with sections {sorted(SECTIONS)}")
    section_name, key = parts[0], parts[1]
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise MobileLLMError(f"unknown config key {dotted!r}; {section_name} has {sorted(hints)}")
    if len(parts) > 2:  # model.overrides.vocab_size
        if hints[key] is not dict and typing.get_origin(hints[key]) is not dict:
            raise MobileLLMError(f"config key {dotted!r}: {section_name}.{key} is not a mapping")
        getattr(section, key)[".".join(parts[2:])] = yaml.safe_load(value) if isinstance(value, str) else value
        return
    setattr(section, key, _coerce(value, hints[key], dotted))


def load(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file (optional) then `section.key=value` overrides, in order."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MobileLLMError(f"training config {p} not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise MobileLLMError(f"training config {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    cfg = from_dict(data)
    for item in overrides or []:
        key, _, value = item.partition("=")
        set_value(cfg, key, value)
    return cfg
