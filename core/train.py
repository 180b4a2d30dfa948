"""One QDyLoRA training run: data → 4-bit base + dynamic-rank adapter → run folder.

The run folder holds everything needed to continue or use the run (see
docs/ARCHITECTURE.md): the resolved config, status, progress events, the rank
histogram, checkpoints and the final adapter at r_max.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core import runstate, threads
from core.errors import RunError, UserError
from core.eta import MovingRate
from core.lm_loss import LossOutput, causal_lm_loss, fused_head_supported, model_loss
from core.lowmem import release_freed_memory, store_frozen_embeddings_16bit
from core.models import load_base_model, resolve_model_path
from core.packing import pack
from core.prompting import EncodedExample, collate, encode_example
from core.qdylora import RankSampler, inject_qdylora, save_adapter, set_rank
from core.qdylora.inject import (
    UntrainedRowGuard, adapter_param_count, adapter_parameters, adapter_state_dict, load_adapter_state_dict, set_example_ranks,
)
from core.train_config import CONFIG_FILE, TrainConfig, load_run_config  # noqa: F401 (re-exported)

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
ETA_WINDOW_STEPS = 10   # the time-left estimate follows the last 10 steps (core.eta)
# A faster way of computing the loss is used only if it gives the plain model's loss on the run's own data
# (relative; 16-bit compute rounds each logit to ~0.4 %, so it gets a wider margin).
SAME_LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
log = logging.getLogger("rank_studio.train")


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # completed | cancelled
    steps_done: int
    total_steps: int
    final_loss: float | None


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class BatchOrder:
    """Micro-batch k → example indices; a pure function of (seed, k) so resume needs no state."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self._perms[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over the tokens the loss is on (the response), as in in-place distillation."""
    mask = labels[:, 1:] != -100
    return distillation_kl(student_logits[:, :-1][mask], teacher_logits[:, :-1][mask])


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over rows of logits that are already the labelled positions."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def encode_dataset(tokenizer, examples, max_length: int) -> tuple[list[EncodedExample], dict]:
    encoded, truncated, dropped = [], 0, []
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex.prompt, ex.response, max_length, messages=ex.messages)
        if enc is None:
            dropped.append(i + 1)
            continue
        truncated += enc.truncated
        encoded.append(enc)
    report = {
        "examples_read": len(examples), "examples_used": len(encoded), "truncated": truncated,
        "dropped_prompt_too_long": dropped, "max_length": max_length,
    }
    return encoded, report


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    return out


# --- checkpoints: tensors in safetensors, the rest in JSON (no pickle anywhere) ---

def _save_checkpoint(run_dir: Path, model, optimizer, scheduler, sampler, step: int, histogram: dict, losses: list) -> None:
    from safetensors.torch import save_file

    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    tmp.mkdir(exist_ok=True)
    save_file(adapter_state_dict(model), str(tmp / "adapter.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        "step": step, "param_groups": opt_state["param_groups"], "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
        "histogram": histogram, "recent_losses": losses[-50:],
        "torch_rng": torch.get_rng_state().tolist(),
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    # Swap in two renames so a kill at any moment leaves one complete checkpoint.
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        import shutil

        shutil.rmtree(old)


def _find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        folder = run_dir / name
        if (folder / "state.json").is_file():
            return folder
    return None


def _load_checkpoint(folder: Path, model, optimizer, scheduler, sampler) -> dict:
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(str(folder / "adapter.safetensors")))
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    sampler.load_state_dict(meta["sampler"])
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta


class Trainer:
    """A recipe: `setup` (validate, load, inject), `train` (the loop), `finish` (save)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.cfg = cfg
        self.resume = resume
        self.run_dir = Path(cfg.out)
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.step = 0
        self.histogram: dict[str, int] = {}
        self.losses: list[float] = []
        self._log_handler: logging.Handler | None = None

    # --- setup ---
    def _check_out_dir(self) -> None:
        if self.resume:
            load_run_config(self.run_dir)
            status = runstate.read_status(self.run_dir)
            if status and status["status"] == "running":
                raise RunError(f"{self.run_dir} is still running (pid {status.get('pid')}); cancel it before resuming")
            if _find_checkpoint(self.run_dir) is None:
                raise RunError(f"{self.run_dir} has no checkpoint to resume from; start a new run instead")
        elif not runstate.folder_is_empty_or_missing(self.run_dir):
            raise UserError(f"output folder {self.run_dir} already holds files; choose a new folder or use --resume")

    def setup(self) -> None:
        from core.data import load_training_data

        self._check_out_dir()
        # Read and validate the data before creating anything, so bad data leaves no run folder.
        data = load_training_data(self.cfg.data, prompt_col=self.cfg.prompt_col, response_col=self.cfg.response_col)
        resolve_model_path(self.cfg.model)  # an unknown model must fail before a run folder exists
        if self.cfg.init_from and not self.resume:
            from core.refine import check_warm_start

            check_warm_start(self.cfg)  # a bad parent run must fail before a run folder exists
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_handler = runstate.attach_log(self.run_dir, "train.log")
        runstate.write_status(self.run_dir, "running", step=0, total_steps=self.cfg.steps, phase="loading model")
        torch.manual_seed(self.cfg.seed)
        self.model, self.tokenizer, self.resolved = load_base_model(self.cfg.model_spec())
        # With a 4-bit base the float embeddings/head are most of the weights; 16 bits hold them exactly (core.lowmem).
        self.narrowed = store_frozen_embeddings_16bit(self.model) if self.resolved.quant != "none" else {}
        self.qcfg = self.cfg.qdylora_config()
        self.adapted = inject_qdylora(self.model, self.qcfg)
        if self.cfg.init_from and not self.resume:
            from core.refine import warm_start_state

            load_adapter_state_dict(self.model, warm_start_state(self.cfg.init_from, self.cfg.init_rank, self.qcfg))
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.examples, report = encode_dataset(self.tokenizer, data.examples, self.cfg.max_length)
        report["skipped_rows"] = data.skipped
        if not self.examples:
            raise UserError(f"{self.cfg.data}: every example is longer than max_length={self.cfg.max_length} before its answer starts")
        runstate.write_json_atomic(self.run_dir / "data_report.json", report)
        self.order = BatchOrder(len(self.examples), self.cfg.batch_size, self.cfg.seed)
        self.fused_loss, self.packed = self._choose_loss_path()
        release_freed_memory()  # what loading and quantizing left on the heap
        self.params = adapter_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = int(round(self.cfg.warmup_ratio * self.cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg.lr_schedule, self.cfg.steps, warmup))
        self.sampler = RankSampler(self.qcfg, self.cfg.seed)
        if self.resume:
            meta = _load_checkpoint(_find_checkpoint(self.run_dir), self.model, self.optimizer, self.scheduler, self.sampler)
            self.step, self.histogram, self.losses = meta["step"], meta["histogram"], meta["recent_losses"]
            log.info("resumed at step %d of %d", self.step, self.cfg.steps)
        else:
            runstate.write_json_atomic(self.run_dir / CONFIG_FILE, {
                "train": self.cfg.to_dict(), "qdylora": self.qcfg.to_dict(), "model": self.resolved.to_dict(),
                "adapted_modules": self.adapted, "versions": _versions(), "created_at": time.time(),
                "execution": self.execution(),
            })
        self.data_report = report

    def execution(self) -> dict:
        """How this process computes the run (none of it changes the results beyond float rounding)."""
        return {"loss": "fused head + cross-entropy on answer tokens" if self.fused_loss else "model loss",
                "batching": "packed" if self.packed else "padded", "embeddings_16bit": self.narrowed,
                "threads": threads.describe()}

    def _choose_loss_path(self) -> tuple[bool, bool]:
        """(fused loss, packed rows): each used only if it gives model(**padded batch).loss on this run's model and data."""
        fused = fused_head_supported(self.model)
        want_packing = self.cfg.batching == "packed"
        if not (fused or want_packing):
            return False, False
        # The longest example and the two shortest: the short ones share a row when they fit, so the check sees packing.
        by_length = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i].input_ids))
        probe = [self.examples[i] for i in dict.fromkeys([by_length[-1], *by_length[:2]])]
        padded = self._to_device(collate(probe, self.tokenizer.pad_token_id))
        packed = self._to_device(pack(probe, self.tokenizer.pad_token_id).tensors)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                reference = float(self.model(**padded).loss)
                fused = fused and self._same_loss(reference, causal_lm_loss(self.model, padded).loss, "the fused loss")
                loss_of = causal_lm_loss if fused else model_loss
                want_packing = want_packing and self._same_loss(reference, loss_of(self.model, packed).loss, "packed rows")
        finally:
            self.model.train(was_training)
        return fused, want_packing

    def _same_loss(self, reference: float, value: torch.Tensor, what: str) -> bool:
        tolerance = SAME_LOSS_TOLERANCE.get(self.resolved.compute_dtype, 1e-2)
        same = abs(float(value) - reference) <= tolerance * max(1.0, abs(reference))
        if not same:
            log.warning("%s gave loss %.6f instead of %.6f on this model; using the plain computation", what, float(value), reference)
        return same

    def _emit(self, event: dict) -> None:
        event.setdefault("time", time.time())
        runstate.append_event(self.run_dir, event)
        self.on_event(event)

    # --- the loop ---
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.resolved.device
        return {key: value.to(device) for key, value in batch.items()}

    def _micro_examples(self, k: int) -> list[EncodedExample]:
        return [self.examples[i] for i in self.order.indices(k)]

    def _layout(self, examples: list[EncodedExample], ranks: list[int] | None = None) -> tuple[dict, list[int] | None, int]:
        """(tensors for the model, the rank of each row or None, real tokens) of one micro-batch."""
        ranks = ranks if ranks is not None and len(set(ranks)) > 1 else None
        tokens = sum(len(e.input_ids) for e in examples)
        if self.packed:
            packed = pack(examples, self.tokenizer.pad_token_id, ranks)
            return self._to_device(packed.tensors), packed.row_ranks, tokens
        return self._to_device(collate(examples, self.tokenizer.pad_token_id)), ranks, tokens

    def _micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch k as the model takes it (packed or padded, as this run computes)."""
        return self._layout(self._micro_examples(k))[0]

    def _loss(self, batch: dict[str, torch.Tensor], with_logits: bool = False) -> LossOutput:
        return (causal_lm_loss if self.fused_loss else model_loss)(self.model, batch, with_logits=with_logits)

    def step_ranks(self, sampled: list[int]) -> list[list[int]]:
        """Per micro-batch, the rank of each of its examples: the step's examples split into len(sampled) groups."""
        bs, accum, k = self.cfg.batch_size, self.cfg.grad_accum, len(sampled)
        n = bs * accum
        return [[sampled[(m * bs + i) * k // n] for i in range(bs)] for m in range(accum)]

    def _set_ranks(self, ranks: list[int]) -> None:
        if len(set(ranks)) == 1:
            set_rank(self.model, ranks[0])
        else:
            set_example_ranks(self.model, ranks)

    def train_step(self, rank: int | list[int]) -> tuple[float, int]:
        """One optimizer step at the sampled rank(s) (plus the sandwich ranks); returns (mean loss at the sampled ranks, tokens)."""
        sampled = [rank] if isinstance(rank, int) else list(rank)
        extra = {"none": [], "max": [self.qcfg.r_max], "min_max": [self.qcfg.r_max, 1]}[self.qcfg.extra_ranks]
        passes = 1 + len(extra)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, tokens = 0.0, 0
        distill = self.qcfg.distill > 0
        for micro, micro_ranks in enumerate(self.step_ranks(sampled)):
            examples = self._micro_examples(self.step * self.cfg.grad_accum + micro)
            batch, row_ranks, micro_tokens = self._layout(examples, micro_ranks)
            teacher = None
            for i, extra_rank in enumerate(extra):
                set_rank(self.model, extra_rank)
                out = self._loss(batch, with_logits=distill and i == 0)
                (out.loss / (self.cfg.grad_accum * passes)).backward()
                if i == 0 and distill:
                    teacher = out.logits.detach()
                del out
            self._set_ranks(row_ranks if row_ranks is not None else micro_ranks[:1])
            out = self._loss(batch, with_logits=teacher is not None)
            loss = out.loss
            if teacher is not None:
                w = self.qcfg.distill
                loss = (1 - w) * loss + w * distillation_kl(out.logits, teacher)
            (loss / (self.cfg.grad_accum * passes)).backward()
            total_loss += out.loss.item() / self.cfg.grad_accum
            tokens += micro_tokens
            del out, teacher
        set_rank(self.model, max(sampled + extra))
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        guard = UntrainedRowGuard(self.model, max(sampled + extra), self.qcfg.update)
        self.optimizer.step()
        guard.restore()
        self.scheduler.step()
        return total_loss, tokens

    def train(self) -> TrainResult:
        cfg = self.cfg
        self._emit({
            "event": "start", "step": self.step, "total_steps": cfg.steps, "resumed": self.resume,
            "examples": len(self.examples), "truncated": self.data_report["truncated"],
            "trainable_params": adapter_param_count(self.model, cfg.r_max), "model": self.resolved.name,
            "quant": self.resolved.quant, "device": self.resolved.device,
        })
        runstate.write_status(self.run_dir, "running", step=self.step, total_steps=cfg.steps, phase="training")
        started = last = time.time()
        rate = MovingRate(ETA_WINDOW_STEPS)
        status = "completed"
        while self.step < cfg.steps:
            if self.should_stop():
                status = "cancelled"
                break
            threads.adjust()
            t0 = time.time()
            ranks = self.sampler.sample_step(self.qcfg.ranks_per_step)
            loss, tokens = self.train_step(ranks)
            self.step += 1
            for rank in ranks:
                self.histogram[str(rank)] = self.histogram.get(str(rank), 0) + 1
            self.losses.append(loss)
            now = time.time()
            rate.add(1, now - last)  # step to step: the checkpoint written after a step counts too
            last = now
            elapsed = now - started
            event = {
                "event": "step", "step": self.step, "total_steps": cfg.steps, "loss": loss, "rank": max(ranks), "ranks": ranks,
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(time.time() - t0, 1e-9),
                "elapsed_s": elapsed, "eta_s": rate.eta(cfg.steps - self.step),
                "mem_mb": runstate.memory_mb(self.resolved.device),
            }
            self._emit(event)
            log.info("step %d/%d loss %.4f rank %s", self.step, cfg.steps, loss, ",".join(map(str, ranks)))
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            runstate.write_status(self.run_dir, "running", step=self.step, total_steps=cfg.steps, phase="training", loss=loss)
        if status == "cancelled":
            self.save_checkpoint()
        return self.finish(status)

    def save_checkpoint(self) -> None:
        _save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.sampler, self.step, self.histogram, self.losses)
        runstate.write_json_atomic(self.run_dir / "rank_histogram.json", dict(sorted(self.histogram.items(), key=lambda kv: int(kv[0]))))

    def finish(self, status: str) -> TrainResult:
        set_rank(self.model, self.cfg.r_max)
        save_adapter(self.model, self.qcfg, self.run_dir / ADAPTER_DIR)
        runstate.write_json_atomic(self.run_dir / "rank_histogram.json", dict(sorted(self.histogram.items(), key=lambda kv: int(kv[0]))))
        final_loss = self.losses[-1] if self.losses else None
        runstate.write_status(self.run_dir, status, step=self.step, total_steps=self.cfg.steps, loss=final_loss)
        self._emit({"event": "end", "status": status, "step": self.step, "total_steps": self.cfg.steps})
        log.info("run %s at step %d", status, self.step)
        return TrainResult(self.run_dir, status, self.step, self.cfg.steps, final_loss)

    def fail(self, exc: BaseException) -> None:
        runstate.record_failure(self.run_dir, exc, step=self.step, total_steps=self.cfg.steps)

    def cleanup(self) -> None:
        runstate.detach_log(self._log_handler)


def train(cfg: TrainConfig, resume: bool = False, on_event=None, should_stop=None) -> TrainResult:
    """Run (or resume) a training run; the run folder records the outcome either way."""
    if resume:
        saved = load_run_config(Path(cfg.out))["train"]
        cfg = TrainConfig.from_dict(saved | {"out": cfg.out})
    trainer = Trainer(cfg, resume=resume, on_event=on_event, should_stop=should_stop)
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as exc:
        trainer.fail(exc)
        raise
    finally:
        trainer.cleanup()
