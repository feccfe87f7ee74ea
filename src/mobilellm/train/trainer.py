"""The training loop: one code path for a CPU, one GPU and many GPUs/nodes under torchrun.

Per step: `grad_accum` micro-batches per rank (gradient sync only on the last), loss straight from
hidden states (fused linear + cross-entropy), clip, AdamW, schedule. Non-finite losses skip the
update; too many in a row stop the run with the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import yaml
from torch import nn

from mobilellm.checkpoint import check_vocab, load_model_dir, save_model_dir
from mobilellm.config import ModelConfig
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import WriteError, write_failure, write_text_atomic
from mobilellm.model import MobileLLM
from mobilellm.train import state as run_state
from mobilellm.train.config import TrainConfig
from mobilellm.train.distributed import Dist, check_shared_parameters, set_grad_sync, setup, teardown, wrap
from mobilellm.train.loss import linear_cross_entropy
from mobilellm.train.optim import build_optimizer, lr_at
from mobilellm.train.progress import TrainProgress
from mobilellm.train.rundir import RunLock, start_point


class CausalLMLoss(nn.Module):
    """The model plus its loss, so DDP/FSDP wrap one module whose forward returns the loss."""

    def __init__(self, model: MobileLLM, chunk_tokens: int, compute_dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.compute_dtype = compute_dtype

        self.distiller = None  # set for knowledge distillation (train/distill.py)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.hidden_states(inputs, positions=positions, attn_mask=attn_mask)  # (B, T, dim)
        if self.distiller is not None and self.training:  # validation scores the student's own cross-entropy
            extra = {"row_ids": row_ids} if row_ids is not None else {}  # fine-tuning rows: the teacher cache key
            return self.distiller(hidden, self.model.output_weight, inputs, targets, positions, attn_mask, **extra)
        return linear_cross_entropy(hidden, self.model.output_weight, targets, self.chunk_tokens, self.compute_dtype)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    tokens: int
    total_steps: int = 0  # what the config asked for
    stopped_early: bool = False  # the time limit ended the run before total_steps
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update), over the whole run
    losses: list = field(default_factory=list)  # (step, loss) of this process's run
    val_loss: float | None = None
    elapsed_s: float = 0.0
    time_limit_minutes: float | None = None

    def warnings(self) -> list[str]:
        """Lines to print after the summary: what makes this model less trained than asked for."""
        out = []
        if self.skipped_steps:
            out.append(f"warning: {self.skipped_steps} of the {self.steps} steps were skipped (loss or gradient "
                       f"not finite, no update); lower optim.lr or check the data")
        if self.stopped_early:
            out.append(f"warning: run.time_limit_minutes={self.time_limit_minutes:g} stopped training at step "
                       f"{self.steps} of {self.total_steps} ({self.steps / max(self.total_steps, 1):.0%}): the model "
                       f"is undertrained; run the same command again to continue from its checkpoint, or raise "
                       f"the limit")
        return out


@dataclass
class TrainData:
    """What the loop consumes. `stream`: this rank's endless micro-batches with state_dict() /
    load_state_dict(); `val_batches()`: validation micro-batches. A batch is (inputs, targets) or a
    dict with inputs, targets and optionally positions, attn_mask, row_ids (index of each row in a
    finite training set) and weight (rows that count)."""

    stream: object
    val_batches: Callable[[], Iterable] | None
    tokenizer: object | None
    steps_per_epoch: int | None = None


def pretraining_data(cfg: TrainConfig, vocab_size: int, env: Dist) -> TrainData:
    """Packed token shards from `mobilellm prepare` (data.train), validation on their val split."""
    from mobilellm.data.loader import BatchStream, PackedTokens, check_tokenizer_matches, validation_batches

    if cfg.distill.cache_dir:
        raise MobileLLMError("distill.cache_dir is for fine-tuning (rows seen for several epochs); pretraining "
                             "sees each row once, so a teacher cache would only cost disk: unset it")
    if len(cfg.data.train) != 1:
        raise MobileLLMError("data.train takes exactly one prepared dataset directory (mix sources at prepare time)")
    train_dir = cfg.data.train[0]
    train_tokens = PackedTokens(train_dir, "train", cfg.data.seq_len)
    check_tokenizer_matches(train_tokens.manifest, vocab_size, None)
    val_dir = cfg.data.val or train_dir
    val = None
    try:
        val = PackedTokens(val_dir, "val", cfg.data.seq_len)
        if len(val) == 0:
            val = None
    except MobileLLMError:
        if cfg.data.val:  # asked for explicitly: the error matters
            raise
    if val is not None:
        check_tokenizer_matches(val.manifest, vocab_size, train_tokens.tokenizer_fingerprint)

    def val_batches():
        for inputs, targets in validation_batches(val, cfg.batch.micro_batch, cfg.run.eval_batches, env.rank,
                                                  env.world_size):
            if inputs.shape[0] == 0:  # high ranks can get an empty last batch: a dummy row keeps collectives in step
                row = torch.as_tensor(val.batch([0]), dtype=torch.long)
                yield {"inputs": row[:, :-1], "targets": row[:, 1:], "weight": 0}
            else:
                yield {"inputs": inputs, "targets": targets}

    stream = BatchStream(train_tokens, cfg.batch.micro_batch, rank=env.rank, world_size=env.world_size,
                         seed=cfg.run.seed, num_workers=cfg.data.num_workers)
    return TrainData(stream=stream, val_batches=val_batches if val is not None and cfg.run.eval_batches else None,
                     tokenizer=tokenizer_for(train_dir))


def tokenizer_for(dataset_dir: str):
    """The tokenizer the data was prepared with (stored beside the manifest), for model dirs."""
    from mobilellm.tokenizer import load_tokenizer

    try:
        return load_tokenizer(dataset_dir)
    except MobileLLMError:
        return None


def as_batch(batch, device: torch.device) -> tuple[dict, int]:
    """A batch as model keyword arguments on `device`, and the number of rows that count."""
    if not isinstance(batch, dict):
        batch = {"inputs": batch[0], "targets": batch[1]}
    weight = batch.get("weight", batch["inputs"].shape[0])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "weight"}, weight


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_peak_tflops(device: torch.device) -> float | None:
    """bf16 matmul throughput of this GPU, the denominator of MFU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, iters = time.perf_counter(), 20
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


class MetricsLog:
    """JSONL always; TensorBoard when available; only on the main rank."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        """start_step: the step the run starts from; records of later steps (a run that went on after
        the checkpoint it resumes from, or an earlier run that saved none) are dropped."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        _keep_records_until(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events of steps >= it written before this run
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise WriteError(self.path, write_failure(err) or str(err), _checkpoints_note(self.path.parent)) from None
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _keep_records_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a crash
    write_text_atomic(path, "".join(kept))


def _checkpoints_note(run_dir: Path) -> str:
    found = run_state.checkpoints(run_dir)
    return f"earlier checkpoints are intact (newest: {found[-1][1]})" if found else "no checkpoint was saved yet"


@torch.no_grad()
def validation_loss(loss_module: CausalLMLoss, data: TrainData, env: Dist, autocast) -> float | None:
    if data.val_batches is None:
        return None
    was_training = loss_module.training
    loss_module.eval()
    total, rows = 0.0, 0
    for batch in data.val_batches():
        kwargs, weight = as_batch(batch, env.device)
        with autocast():
            total += loss_module(**kwargs).item() * weight
        rows += weight
    loss_module.train(was_training)
    total, rows = env.mean(total) * env.world_size, env.mean(rows) * env.world_size
    return total / rows if rows else None


def train(cfg: TrainConfig, resume: str | None = "auto", progress: bool = True,
          data_fn: Callable[[TrainConfig, ModelConfig, Dist], TrainData] | None = None,
          overwrite: bool = False) -> TrainResult:
    """Run (or resume) training. data_fn builds the data (default: prepared token shards); `resume` and
    `overwrite` are as for rundir.start_point."""
    cfg.validate()
    env = setup(cfg.run.device)
    lock = RunLock(Path(cfg.run.out_dir))
    try:
        return _train(cfg, env, resume, progress, data_fn or (lambda c, m, e: pretraining_data(c, m.vocab_size, e)),
                      lock, overwrite)
    finally:
        lock.release()
        teardown()


def _claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool, lock: RunLock, env: Dist) -> Path | None:
    """Lock the run folder, check it holds no other run, clean up; returns the checkpoint to resume from."""
    checkpoint, failure = None, None
    if env.is_main:
        try:
            notes = lock.acquire()
            checkpoint, more = start_point(run_dir, resume, overwrite)
            for line in notes + more:
                print(line, file=sys.stderr, flush=True)
            run_state.remove_partial_saves(run_dir)
        except Exception as err:  # every rank learns of it before the main one raises
            failure = err
    if not env.all_true(failure is None):
        raise failure if failure is not None else MobileLLMError("the main process could not start the run")
    if not env.is_main:  # the main process has cleaned up: the same answer
        checkpoint = run_state.resolve_resume(run_dir, "none" if overwrite and resume == "auto" else resume)
    return checkpoint


def _train(cfg: TrainConfig, env: Dist, resume: str | None, progress: bool, data_fn, lock: RunLock,
           overwrite: bool) -> TrainResult:
    started = time.perf_counter()
    run_dir = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    if cfg.model.init_from:
        model = load_model_dir(cfg.model.init_from)
        model_cfg = model.config  # the directory's shape wins over the preset
    else:
        model_cfg = cfg.model_config()
        model = MobileLLM(model_cfg)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise MobileLLMError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    accum, global_seqs = cfg.batch_plan(env.world_size)
    tokens_per_step = global_seqs * cfg.data.seq_len
    data = data_fn(cfg, model_cfg, env)
    tokenizer = data.tokenizer
    check_vocab(tokenizer, model_cfg, "the training tokenizer")  # saved with the model: it must fit the embedding
    if cfg.run.max_steps:
        total_steps = cfg.run.max_steps
    elif cfg.run.max_tokens:
        total_steps = math.ceil(cfg.run.max_tokens / tokens_per_step)
    else:  # epochs of a finite (fine-tuning) set
        total_steps = math.ceil(cfg.run.epochs * data.steps_per_epoch / accum)
    peak_lr = cfg.peak_lr(tokens_per_step)

    use_cuda = env.device.type == "cuda"
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and use_cuda)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # ---- model, wrapping, optimizer
    model.to(env.device).train()
    model.activation_checkpointing = cfg.run.activation_checkpointing
    if bf16 and not cfg.run.fp32_residual:
        model.residual_dtype = torch.bfloat16
    loss_module = CausalLMLoss(model, cfg.run.loss_chunk_tokens, compute_dtype)
    if cfg.distill.teacher:
        from mobilellm.train.distill import Distiller

        loss_module.distiller = Distiller.from_dir(cfg.distill.teacher, model_cfg.vocab_size, env.device,
                                                   alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                                                   cache_dir=cfg.distill.cache_dir, cache_top_k=cfg.distill.cache_top_k,
                                                   rows=getattr(data.stream, "rows", None))
    if cfg.run.compile if cfg.run.compile is not None else use_cuda:
        for block in model.layers:  # one compiled graph serves every (shared) block
            block.compile()
    wrapped = wrap(loss_module, model.layers, cfg.run.distributed, env, shard_blocks=model_cfg.layer_sharing == "none",
                   shard_size=cfg.run.hsdp_shard_size)
    check_shared_parameters(model)
    optimizer = build_optimizer(model, cfg, peak_lr, env.device)

    step, tokens_seen, skipped, run_id = 0, 0, 0, run_state.new_run_id()
    stream = data.stream
    checkpoint = _claim_run_dir(run_dir, resume, overwrite, lock, env)
    if env.is_main:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(
            {**cfg.to_dict(), "resolved": {"model": model_cfg.to_dict(), "world_size": env.world_size,
                                          "grad_accum": accum, "global_batch_seqs": global_seqs,
                                          "tokens_per_step": tokens_per_step, "total_steps": total_steps,
                                          "peak_lr": peak_lr}}, sort_keys=False))
    if checkpoint is not None:
        saved = _restore(checkpoint, model, optimizer, stream, env, model_cfg)
        step, tokens_seen, skipped = saved["step"], saved["tokens"], saved.get("skipped_steps", 0)
        run_id = saved.get("run_id") or run_id  # converted old checkpoints have none
    env.barrier()

    def model_writer(full_state: dict):
        def write(directory: Path) -> None:
            with torch.device("meta"):
                cpu_model = MobileLLM(model_cfg)
            cpu_model = cpu_model.to_empty(device="cpu")
            cpu_model.load_state_dict({k: v.float() for k, v in full_state.items()})
            save_model_dir(cpu_model, directory, tokenizer=tokenizer)
        return write

    def save_checkpoint() -> None:
        model_state, optim_state = _full_state(model, optimizer, env, with_optimizer=True)
        if env.is_main:
            trainer_state = {"step": step, "tokens": tokens_seen, "optimizer": optim_state,
                             "data": stream.state_dict(), "rng": run_state.rng_state(),
                             "model_config": model_cfg.to_dict(), "world_size": env.world_size,
                             "run_id": run_id, "skipped_steps": skipped}
            run_state.save(run_dir, step, model_writer(model_state), trainer_state, cfg.run.keep_last,
                           cfg.run.milestone_every, set(cfg.run.keep_steps))
        env.barrier()

    def write_final_model() -> None:
        model_state = _full_state(model, optimizer, env, with_optimizer=False)[0]
        if env.is_main:
            try:
                model_writer(model_state)(result.final_dir)
            except WriteError as err:
                raise WriteError(err.path, err.reason, f"the checkpoint of step {step} is intact") from None
        env.barrier()

    log = MetricsLog(run_dir, env.is_main, cfg.run.tensorboard, start_step=step)
    peak_tflops = cfg.run.peak_tflops or measure_peak_tflops(env.device)
    flops_per_token = 3 * model_cfg.flops_per_token(cfg.data.seq_len)
    deadline = started + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    bar = TrainProgress(total_steps, step, deadline, enabled=progress and env.is_main)

    result = TrainResult(run_dir=run_dir, final_dir=run_dir / "final", steps=step, tokens=tokens_seen,
                         total_steps=total_steps, time_limit_minutes=cfg.run.time_limit_minutes)
    batches = iter(stream)
    bad_steps, last_saved = 0, step if checkpoint is not None else -1
    interval_t0, interval_tokens = time.perf_counter(), 0
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, peak_lr, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(accum):
                kwargs, _ = as_batch(next(batches), env.device)
                with set_grad_sync(wrapped, micro == accum - 1), autocast():
                    loss = wrapped(**kwargs)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                                        else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            loss_value = env.mean((loss_sum / accum).item())
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm.item())
            if finite:
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            interval_tokens += tokens_per_step
            result.losses.append((step, loss_value))
            if not finite and bad_steps > cfg.run.max_bad_steps:
                found = run_state.checkpoints(run_dir)
                keep = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was saved yet"
                raise MobileLLMError(f"loss was not finite for {bad_steps} consecutive steps (at step {step}); "
                                     f"stopping: {keep}. Lower optim.lr or check the data")

            if step % cfg.run.log_every == 0 or step == total_steps:
                if use_cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tok_s = interval_tokens / max(now - interval_t0, 1e-9)
                interval_t0, interval_tokens = now, 0
                record = {"step": step, "tokens": tokens_seen, "loss": loss_value, "lr": lr,
                          "grad_norm": grad_norm.item(), "tok_per_s": tok_s,
                          "peak_mem_gib": peak_memory_gib(env.device), "skipped": not finite,
                          "skipped_steps": skipped}
                if peak_tflops:
                    record["mfu"] = tok_s * flops_per_token / (peak_tflops * 1e12 * env.world_size)
                log.write(record)
                bar.rates = {"tok/s": f"{tok_s:,.0f}", **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})}
            bar.step(step, loss_value, lr)
            if cfg.run.time_limit_minutes:
                over = time.perf_counter() - started > 60 * cfg.run.time_limit_minutes
                if not env.all_true(not over):  # any rank past the limit: all stop at the same step
                    result.stopped_early = step < total_steps
                    break
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps:
                val_loss = validation_loss(loss_module, data, env, autocast)
                if val_loss is not None:
                    log.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            # no periodic saves inside a run of skipped steps: they could rotate out the good ones
            periodic = cfg.run.save_every and step % cfg.run.save_every == 0
            if (periodic or step in cfg.run.keep_steps) and step < total_steps and bad_steps == 0:
                save_checkpoint()
                last_saved = step
    except KeyboardInterrupt:
        if step > 0 and last_saved != step:
            save_checkpoint()  # resume with --resume auto
        raise
    finally:
        bar.close()

    if step > 0 and skipped == step:
        raise MobileLLMError(f"no step trained: all {step} steps had a non-finite loss or gradient and were skipped "
                             f"(no checkpoint written); lower optim.lr or check the data")
    result.val_loss = validation_loss(loss_module, data, env, autocast)
    if result.val_loss is not None:
        log.write({"step": step, "val_loss": result.val_loss, "val_ppl": math.exp(min(result.val_loss, 50))})
    if last_saved != step:
        save_checkpoint()
    write_final_model()
    env.barrier()
    log.close()
    result.steps, result.tokens, result.skipped_steps = step, tokens_seen, skipped
    result.elapsed_s = time.perf_counter() - started
    return result


def _full_state(model: MobileLLM, optimizer, env: Dist, with_optimizer: bool):
    """Full (unsharded) model and optimizer state on the main rank, whatever the wrapping."""
    if not env.enabled:
        return model.state_dict(), (optimizer.state_dict() if with_optimizer else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if with_optimizer:
        return get_state_dict(model, optimizer, options=options)
    return get_model_state_dict(model, options=options), None


def _restore(checkpoint: Path, model: MobileLLM, optimizer, stream, env: Dist, model_cfg) -> dict:
    """Load a checkpoint into the model, optimizer and data stream; returns its trainer state."""
    saved = run_state.load_trainer_state(checkpoint)
    if saved.get("model_config") != model_cfg.to_dict():
        raise MobileLLMError(f"checkpoint {checkpoint} was made with another model config; "
                             "use a new run.out_dir or the same model settings")
    weights = load_model_dir(checkpoint / "model").state_dict()
    if env.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=saved["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
    stream.load_state_dict(saved["data"])
    if saved.get("world_size", 1) == env.world_size:
        run_state.set_rng_state(saved["rng"])
    return saved
