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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core import distributed, runstate, threads
from core.compiling import compile_decoder_layers, compiler_problem
from core.errors import RunError, TrainingDiverged, UserError
from core.eta import MovingRate
from core.fileio import DamagedFile, fsync_dir, fsync_tree, read_json
from core.lm_loss import LossOutput, causal_lm_loss, fused_head_supported, model_loss
from core.lowmem import map_large_blocks, release_freed_memory, store_frozen_embeddings_16bit
from core.models import ResolvedModel, load_base_model, pick_device, resolve_model
from core.packing import pack
from core.preflight import check_output_folder, check_target_modules, make_output_folder
from core.prompting import EncodedExample, collate, encode_example
from core.qdylora import RankSampler, inject_qdylora, save_adapter, set_rank
from core.qdylora.inject import (
    adapter_param_count, adapter_parameters, adapter_state_dict, load_adapter_state_dict, row_step_rule, set_example_ranks,
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


def make_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    """AdamW over the adapter; paged (bitsandbytes) on CUDA when asked, as QLoRA trains."""
    if cfg.optimizer == "paged_adamw":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    if tmp.exists():
        shutil.rmtree(tmp)  # half written by a save that was killed
    tmp.mkdir()
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
    fsync_tree(tmp)
    _swap_in_checkpoint(run_dir, tmp)


def _swap_in_checkpoint(run_dir: Path, tmp: Path) -> None:
    """Make the finished folder `tmp` the checkpoint so that a kill at any moment leaves a
    complete one. checkpoint/ only ever appears by renaming a finished folder, so when it
    exists it is complete and a checkpoint.old/ beside it is a leftover of a killed swap;
    without checkpoint/, checkpoint.old/ is the one to keep until the new one is in place."""
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, also in the middle of a swap that a kill interrupted.

    checkpoint.tmp/ counts only when checkpoint.old/ exists without checkpoint/: the swap
    moves checkpoint/ aside only after the new folder is written and flushed."""
    final, old, tmp = (run_dir / (CHECKPOINT_DIR + suffix) for suffix in ("", ".old", ".tmp"))
    for folder in [final] + ([tmp] if old.exists() and not final.exists() else []) + [old]:
        if (folder / "state.json").is_file():
            return folder
    return None


def settle_checkpoints(run_dir: Path) -> Path | None:
    """Finish a swap that a kill interrupted, so that only checkpoint/ is left; returns it."""
    best = _find_checkpoint(run_dir)
    if best is None:
        return None
    final = run_dir / CHECKPOINT_DIR
    if best != final:
        best.rename(final)
    for leftover in (run_dir / (CHECKPOINT_DIR + ".old"), run_dir / (CHECKPOINT_DIR + ".tmp")):
        if leftover.exists():
            shutil.rmtree(leftover)
    fsync_dir(run_dir)
    return final


def _checkpoint_step(folder: Path) -> int:
    try:
        step = read_json(folder / "state.json", "checkpoint state").get("step", 0)
    except (OSError, DamagedFile, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


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
        self.checkpoint_step: int | None = None
        self._log_handler: logging.Handler | None = None
        # Set once every check passed and the run folder is this run's to write; before
        # that a failure must leave the folder (maybe another run's) untouched.
        self._owns_folder = False
        self.compiled_layers = 0
        self.dist = distributed.DistContext()  # the one-process run until setup joins a launcher's group

    # --- setup ---
    def _check_out_dir(self) -> None:
        check_output_folder(self.cfg.out)  # the text as given: Path("") would read as "."
        if self.resume:
            load_run_config(self.run_dir)
            status = runstate.read_status(self.run_dir)
            if status and status.get("status") == "running":
                raise RunError(f"{self.run_dir} is still running (pid {status.get('pid')}); cancel it before resuming")
            checkpoint = _find_checkpoint(self.run_dir)
            step = _checkpoint_step(checkpoint) if checkpoint else 0
            if status and status.get("status") == "completed" and step >= self.cfg.steps:
                raise RunError(f"{self.run_dir} is already completed ({step} of {self.cfg.steps} steps); nothing to resume")
        elif not runstate.folder_is_empty_or_missing(self.run_dir):
            raise UserError(f"output folder {self.run_dir} already holds files; choose a new folder or use --resume")

    def check_inputs(self):
        """Every check that needs no model, before anything is written; returns the training data."""
        from core.data import load_training_data

        self._check_out_dir()
        # Read and validate the data before creating anything, so bad data leaves no run folder.
        data = load_training_data(self.cfg.data, prompt_col=self.cfg.prompt_col, response_col=self.cfg.response_col)
        planned = resolve_model(self.cfg.model_spec())  # an unknown model must fail before a run folder exists
        check_target_modules(planned.path, self.cfg.target_modules)
        if self.cfg.compile:
            problem = compiler_problem(pick_device(self.cfg.device))
            if problem:
                raise UserError(problem)
        if self.cfg.optimizer == "paged_adamw" and pick_device(self.cfg.device) != "cuda":
            raise UserError("optimizer paged_adamw needs a CUDA GPU (bitsandbytes pages its state between GPU and CPU "
                            "memory); use adamw on CPU")
        if self._warm_start():
            from core.refine import check_warm_start

            check_warm_start(self.cfg)  # a bad parent run must fail before a run folder exists
        return data, planned

    def _warm_start(self) -> bool:
        # A refine run starts from its parent's adapter, unless a checkpoint of its own takes over
        # (a resumed run that was stopped before its first checkpoint starts over, warm again).
        return bool(self.cfg.init_from) and (not self.resume or _find_checkpoint(self.run_dir) is None)

    def setup(self) -> None:
        from core.data import load_training_data

        self.dist = distributed.context(self.cfg.device)
        warm_start = self._warm_start()
        if self.dist.is_main:
            data, planned = self.check_inputs()
            make_output_folder(self.run_dir)
            self._owns_folder = True
            if not self.resume:
                # The config comes first, so a run killed at any later moment can be resumed.
                self._write_config(planned)
            self._log_handler = runstate.attach_log(self.run_dir, "train.log")
            runstate.write_status(self.run_dir, "running", step=0, total_steps=self.cfg.steps, phase="loading model")
        else:  # the launcher and the main process checked the folder; only the main one writes it
            data = load_training_data(self.cfg.data, prompt_col=self.cfg.prompt_col, response_col=self.cfg.response_col)
        torch.manual_seed(self.cfg.seed)
        map_large_blocks()  # dequantized weights in their own mappings: no heap holes (core.lowmem)
        self.model, self.tokenizer, self.resolved = load_base_model(self.cfg.model_spec())
        # With a 4-bit base the float embeddings/head are most of the weights; 16 bits hold them exactly (core.lowmem).
        self.narrowed = store_frozen_embeddings_16bit(self.model) if self.resolved.quant != "none" else {}
        self.qcfg = self.cfg.qdylora_config()
        self.adapted = inject_qdylora(self.model, self.qcfg)
        if warm_start:
            from core.refine import warm_start_state

            load_adapter_state_dict(self.model, warm_start_state(self.cfg.init_from, self.cfg.init_rank, self.qcfg))
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.examples, report = encode_dataset(self.tokenizer, data.examples, self.cfg.max_length)
        report["skipped_rows"] = data.skipped
        if not self.examples:
            raise UserError(f"{self.cfg.data}: every example is longer than max_length={self.cfg.max_length} before its answer starts")
        if self.dist.is_main:
            runstate.write_json_atomic(self.run_dir / "data_report.json", report)
        self.order = BatchOrder(len(self.examples), self.cfg.batch_size, self.cfg.seed)
        fused, packed = self._choose_loss_path()
        # Processes must compute alike: each checked the same probe, and one refusal (rounding) decides for all.
        self.fused_loss = not self.dist.any(not fused, self.resolved.device)
        self.packed = not self.dist.any(not packed, self.resolved.device)
        # After the loss check, which runs once in eval mode: compiling it would cost graphs nothing reuses.
        self.compiled_layers = compile_decoder_layers(self.model) if self.cfg.compile else 0
        release_freed_memory()  # what loading and quantizing left on the heap
        self.params = adapter_parameters(self.model)
        self.optimizer = make_optimizer(self.cfg, self.params)
        warmup = int(round(self.cfg.warmup_ratio * self.cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg.lr_schedule, self.cfg.steps, warmup))
        self.sampler = RankSampler(self.qcfg, self.cfg.seed)
        checkpoint = None
        if self.resume:
            # Only the main process repairs a swap a kill interrupted (the --processes launcher did it
            # before any process started); the others read what is there.
            checkpoint = settle_checkpoints(self.run_dir) if self.dist.is_main else _find_checkpoint(self.run_dir)
        if checkpoint is not None:
            meta = _load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.sampler)
            self.step, self.histogram, self.losses = meta["step"], meta["histogram"], meta["recent_losses"]
            self.checkpoint_step = self.step
            log.info("resumed at step %d of %d", self.step, self.cfg.steps)
        else:
            if self.resume:
                log.info("no checkpoint was saved before the run stopped: starting again from step 0")
            if self.dist.is_main:
                self._write_config(self.resolved, adapted_modules=self.adapted, execution=self.execution())
        self.data_report = report

    def _write_config(self, resolved: ResolvedModel, **extra) -> None:
        runstate.write_json_atomic(self.run_dir / CONFIG_FILE, {
            "train": self.cfg.to_dict(), "qdylora": self.cfg.qdylora_config().to_dict(), "model": resolved.to_dict(),
            **extra, "versions": _versions(), "created_at": time.time(),
        })

    def execution(self) -> dict:
        """How this process computes the run (none of it changes the results beyond float rounding, except that
        compiled layers draw their dropout masks their own way: the same distribution, other draws)."""
        return {"loss": "fused head + cross-entropy on answer tokens" if self.fused_loss else "model loss",
                "batching": "packed" if self.packed else "padded", "embeddings_16bit": self.narrowed,
                "threads": threads.describe(), "processes": self.dist.world, "compiled_layers": self.compiled_layers}

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
        if not self.dist.is_main:
            return
        event.setdefault("time", time.time())
        runstate.append_event(self.run_dir, event)
        self.on_event(event)

    # --- the loop ---
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.resolved.device
        return {key: value.to(device) for key, value in batch.items()}

    def _micro_examples(self, k: int) -> list[EncodedExample]:
        """This process's share of micro-batch k (all of it when training alone)."""
        return [self.examples[i] for i in self.dist.shard(self.order.indices(k))]

    def _layout(self, examples: list[EncodedExample], ranks: list[int] | None = None) -> tuple[dict, list[int] | None]:
        """(tensors for the model, the rank of each row or None) of one micro-batch (or this process's share)."""
        ranks = ranks if ranks is not None and len(set(ranks)) > 1 else None
        if self.packed:
            packed = pack(examples, self.tokenizer.pad_token_id, ranks)
            return self._to_device(packed.tensors), packed.row_ranks
        return self._to_device(collate(examples, self.tokenizer.pad_token_id)), ranks

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

    def _loss_share(self, k: int) -> float:
        """This process's share of micro-batch k's label tokens: weighting its token-mean loss by it makes
        the gradients summed over processes the gradient of the whole micro-batch's token mean (1 alone).

        An example's loss tokens are its labels after the first, padded or packed alike (packing
        ignores each example's first label, which nothing predicts in a padded row either)."""
        if not self.dist.active:
            return 1.0
        everyone = self.order.indices(k)
        label_tokens = [sum(label != -100 for label in self.examples[i].labels[1:]) for i in everyone]
        return sum(self.dist.shard(label_tokens)) / max(1, sum(label_tokens))

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
        if self.dist.active:
            torch.manual_seed(self.dist.dropout_seed(self.cfg.seed, self.step))
        total_loss, tokens = 0.0, 0
        distill = self.qcfg.distill > 0
        for micro, micro_ranks in enumerate(self.step_ranks(sampled)):
            k = self.step * self.cfg.grad_accum + micro
            ranks_here = self.dist.shard(micro_ranks)  # the ranks of this process's examples
            batch, row_ranks = self._layout(self._micro_examples(k), ranks_here)
            share = self._loss_share(k)
            teacher = None
            for i, extra_rank in enumerate(extra):
                set_rank(self.model, extra_rank)
                out = self._loss(batch, with_logits=distill and i == 0)
                (out.loss * share / (self.cfg.grad_accum * passes)).backward()
                if i == 0 and distill:
                    teacher = out.logits.detach()
                del out
            self._set_ranks(row_ranks if row_ranks is not None else ranks_here[:1])
            out = self._loss(batch, with_logits=teacher is not None)
            loss = out.loss
            if teacher is not None:
                w = self.qcfg.distill
                loss = (1 - w) * loss + w * distillation_kl(out.logits, teacher)
            (loss * share / (self.cfg.grad_accum * passes)).backward()
            total_loss += out.loss.item() * share / self.cfg.grad_accum
            tokens += sum(len(self.examples[i].input_ids) for i in self.order.indices(k))  # the whole micro-batch's
            del out, teacher
        self.dist.sum_gradients(self.params)
        total_loss = self.dist.sum_float(total_loss, self.resolved.device)
        set_rank(self.model, max(sampled + extra))
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        rows = row_step_rule(self.model, self.qcfg, max(sampled + extra))
        self.optimizer.step()
        rows.restore()
        self.scheduler.step()
        return total_loss, tokens

    def train(self) -> TrainResult:
        cfg = self.cfg
        self._emit({
            "event": "start", "step": self.step, "total_steps": cfg.steps, "resumed": self.resume,
            "examples": len(self.examples), "truncated": self.data_report["truncated"],
            "trainable_params": adapter_param_count(self.model, cfg.r_max), "model": self.resolved.name,
            "quant": self.resolved.quant, "device": self.resolved.device,
            "processes": self.dist.world, "backend": self.dist.backend,
        })
        self._write_status("running", phase="training")
        started = last = time.time()
        rate = MovingRate(ETA_WINDOW_STEPS)
        status = "completed"
        while self.step < cfg.steps:
            if self.dist.any(self.should_stop(), self.resolved.device):
                status = "cancelled"
                break
            threads.adjust()
            t0 = time.time()
            ranks = self.sampler.sample_step(self.qcfg.ranks_per_step)
            self.dist.check_same_ranks(ranks, self.resolved.device)
            loss, tokens = self.train_step(ranks)
            if not math.isfinite(loss):
                self._diverged(f"the loss became {loss} at step {self.step + 1}")
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
            self._write_status("running", phase="training", loss=loss)
        if status == "cancelled":
            self.save_checkpoint()
        return self.finish(status)

    def _diverged(self, what: str) -> None:
        kept = (f"its last good checkpoint (step {self.checkpoint_step}) is kept"
                if self.checkpoint_step is not None else "no checkpoint had been saved")
        raise TrainingDiverged(f"training diverged: {what}; the run stopped and {kept}. "
                               "Lower the learning rate or alpha and start a new run")

    def _write_status(self, status: str, **fields) -> None:
        if self.dist.is_main:
            runstate.write_status(self.run_dir, status, step=self.step, total_steps=self.cfg.steps, **fields)

    def save_checkpoint(self) -> None:
        # Never overwrite the last good checkpoint with weights that are no numbers any more.
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            self._diverged(f"the adapter weights stopped being finite numbers at step {self.step}")
        if not self.dist.is_main:
            return
        _save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.sampler, self.step, self.histogram, self.losses)
        runstate.write_json_atomic(self.run_dir / "rank_histogram.json", dict(sorted(self.histogram.items(), key=lambda kv: int(kv[0]))))
        self.checkpoint_step = self.step

    def finish(self, status: str) -> TrainResult:
        set_rank(self.model, self.cfg.r_max)
        final_loss = self.losses[-1] if self.losses else None
        if self.dist.is_main:
            save_adapter(self.model, self.qcfg, self.run_dir / ADAPTER_DIR)
            runstate.write_json_atomic(self.run_dir / "rank_histogram.json", dict(sorted(self.histogram.items(), key=lambda kv: int(kv[0]))))
        self._write_status(status, loss=final_loss)
        self._emit({"event": "end", "status": status, "step": self.step, "total_steps": self.cfg.steps})
        log.info("run %s at step %d", status, self.step)
        return TrainResult(self.run_dir, status, self.step, self.cfg.steps, final_loss)

    def fail(self, exc: BaseException) -> None:
        if self._owns_folder and self.dist.is_main:
            runstate.record_failure(self.run_dir, exc, step=self.step, total_steps=self.cfg.steps)

    def cleanup(self) -> None:
        runstate.detach_log(self._log_handler)


def train(cfg: TrainConfig, resume: bool = False, on_event=None, should_stop=None) -> TrainResult:
    """Run (or resume) a training run; the run folder records the outcome either way."""
    if resume:
        check_output_folder(cfg.out)
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
