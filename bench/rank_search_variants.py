"""Rank-elastic training at parity: every one-run recipe against dedicated QLoRA runs, each
side at its best learning rate from the same grid (issue 9).

Sides (default model, NF4, sample_data/train.jsonl, batch 4, max length 192, seed 42):
- `qlora`  : one dedicated PEFT LoRA run per rank r (scale alpha/r), bench/common.PeftLoRATrainer;
- `rslora` : the same with PEFT's use_rslora (scale alpha/sqrt(r));
- `svd_qlora`, `svd_rslora`: the dedicated r = r_max run of that side, cut to rank b by a
  truncated SVD of each layer's update (core.qdylora.truncation; costs no training of its own);
- QDyLoRA recipes: one core.train.Trainer run serving ranks 1..r_max (RECIPES below: scale rule,
  rank sampling, ranks per step, sandwich rule, distillation).

Every (side, rank or recipe, lr, steps) is one job: train, save the adapter, and measure the
per-token reference NLL of each rank on the lr-search subsets of BOTH held-out sets
(`recall`: sample_data/eval.jsonl, references copied from training answers; `reworded`:
sample_data/eval_reworded.jsonl, the same facts in new words). Jobs run in N worker processes
with one thread each (on 2 cores, 2 x 1 thread trains ~1.3x more per second than 1 x 2) and
claim work through files, so an interrupted phase resumes where it stopped.

Then `final` picks, per set, each side's best lr (per rank for dedicated runs: each dedicated run
is tuned on its own; one lr for a one-run recipe: the lowest mean NLL over ranks), evaluates the
chosen adapters on the HELD-OUT REST of each set (the prompts the lr search never saw, so the
pick does not flatter anyone) plus ROUGE-L of greedy answers to 16 of them per set, and computes
paired 95 % intervals of every recipe's gap to the best dedicated run at each rank (same prompts
resampled). `refine` measures how a rank cut from a run improves when trained alone
(`qdylora refine`); `report` prints the final tables in Markdown.

    .venv/bin/python bench/rank_search_variants.py queue --steps 40 --sides ... --lrs ... [--ranks ...] [--front]
    .venv/bin/python bench/rank_search_variants.py train --steps 40 [--workers 2]   # runs the queue
    .venv/bin/python bench/rank_search_variants.py final --steps 40 [--sides qlora,rslora,const]
    .venv/bin/python bench/rank_search_variants.py refine --steps 40 --refine-side svd_qlora --refine-lr 1e-3 --refine-ranks 1
    .venv/bin/python bench/rank_search_variants.py report --steps 40
    .venv/bin/python bench/rank_search_variants.py status --steps 40
    (--quick: 2 steps, 4 prompts, one lr; writes rank_search_variants_quick.json)

Timing: each job records its training seconds and seconds per step, but the grid runs beside
other work; cost ratios are measured separately and interleaved (bench/recipe_cost.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.train_config import LR_SCHEDULES  # noqa: E402

RANKS = [1, 2, 4, 8, 16]
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
SETS = {"recall": common.SAMPLE / "eval.jsonl", "reworded": common.SAMPLE / "eval_reworded.jsonl"}
SEARCH_PROMPTS = 24          # per set, for the lr search (the first ones of each file)
GEN_PROMPTS = 16             # per set, for ROUGE-L in the final evaluation (from the held-out rest)
MAX_NEW_TOKENS = 48
TODAY = {"recipe": "shipped", "lr": 2e-4}  # the defaults before this benchmark (alpha/b, uniform, lr 2e-4)
TARGET_GAP = 0.02
DEFAULT_SEED = 42
BETWEEN_RANKS = [3, 6, 12]   # measured in a seed study besides RANKS
# The lr schedule of every side in a grid (`--schedule`). Set once from the command line; a grid trained with
# another schedule than constant keeps its runs in a folder of its own (root), so schedules never mix in one table.
LR_SCHEDULE = "constant"

# One-run recipes: TrainConfig fields on top of the shared recipe. Order = priority in the queue.
RECIPES: dict[str, dict] = {
    "shipped": {"scale": "alpha/b", "rank_sampling": "uniform"},
    "sqrt": {"scale": "alpha/sqrt(b)", "rank_sampling": "uniform"},
    "sqrt_high": {"scale": "alpha/sqrt(b)", "rank_sampling": "high"},
    "const": {"scale": "constant", "rank_sampling": "uniform"},
    "sqrt_k4": {"scale": "alpha/sqrt(b)", "rank_sampling": "uniform", "ranks_per_step": 4},
    "const_k4": {"scale": "constant", "rank_sampling": "uniform", "ranks_per_step": 4},
    "sqrt_high_k4": {"scale": "alpha/sqrt(b)", "rank_sampling": "high", "ranks_per_step": 4},
    "const_high_k4": {"scale": "constant", "rank_sampling": "high", "ranks_per_step": 4},
    "rowsqrt": {"scale": "alpha/sqrt(i)", "rank_sampling": "uniform"},
    "rowinv": {"scale": "alpha/i", "rank_sampling": "uniform"},
    "rowinv_high": {"scale": "alpha/i", "rank_sampling": "high"},
    "rowinv_k4": {"scale": "alpha/i", "rank_sampling": "uniform", "ranks_per_step": 4},
    "rowinv_nodrop": {"scale": "alpha/i", "rank_sampling": "uniform", "dropout": 0.0},   # a recipe may override the shared config
    "rowinv_pow2": {"scale": "alpha/i", "rank_sampling": "pow2"},
    "rowsqrt_pow2": {"scale": "alpha/sqrt(i)", "rank_sampling": "pow2"},
    # diagnostics of the rank-16 recall plateau (§6.12): every row every step, and rows 2-16 in every other step
    "rowinv_list16": {"scale": "alpha/i", "rank_sampling": "list", "rank_list": [16]},
    "rowinv_list1_16": {"scale": "alpha/i", "rank_sampling": "list", "rank_list": [1, 16]},
    "rowinv_pow2_sandwich": {"scale": "alpha/i", "rank_sampling": "pow2", "extra_ranks": "max"},   # ~2x a step: compare at half the steps
    # §6.13: several ranks' objectives summed in one step at one step's cost (each quarter of the batch at its own rank)
    "rowinv_pow2_k4": {"scale": "alpha/i", "rank_sampling": "pow2", "ranks_per_step": 4},
    "rowinv_pow2_sandwich_kd": {"scale": "alpha/i", "rank_sampling": "pow2", "extra_ranks": "max", "distill": 0.5},   # ~2x a step
    "rowinv_pow2_sandwich_min": {"scale": "alpha/i", "rank_sampling": "pow2", "extra_ranks": "min_max"},   # ~2.8x a step: both ends every step
    "rowinv2": {"scale": "alpha/i^2", "rank_sampling": "uniform"},
    "rowinv_low": {"scale": "alpha/i", "rank_sampling": "low"},
    "rowinv_mom": {"scale": "alpha/i", "rank_sampling": "uniform", "row_steps": "momentum"},
    "rowinv_bal": {"scale": "alpha/i", "rank_sampling": "uniform", "row_steps": "balanced"},
    "sqrt_sandwich": {"scale": "alpha/sqrt(b)", "rank_sampling": "uniform", "extra_ranks": "max"},
    "sqrt_sandwich_kd": {"scale": "alpha/sqrt(b)", "rank_sampling": "uniform", "extra_ranks": "max", "distill": 0.5},
}
DEDICATED = {"qlora": "alpha/b", "rslora": "alpha/sqrt(b)"}      # side → scale rule
SVD_OF = {"svd_qlora": "qlora", "svd_rslora": "rslora"}          # derived side → dedicated side


def shared_config(steps: int, quick: bool, seed: int | None = None) -> dict:
    return {"data": str(common.TRAIN_FILE), "quant": "nf4", "batch_size": 4, "max_length": 64 if quick else 192,
            "seed": DEFAULT_SEED if seed is None else seed, "alpha": 16.0, "dropout": 0.05, "steps": steps, "checkpoint_every": steps,
            "warmup_ratio": 0.03, "lr_schedule": LR_SCHEDULE, "max_grad_norm": 0.3}


def root(steps: int, quick: bool, seed: int | None = None, schedule: str | None = None) -> Path:
    """The grid's folder; a seed study (`--seed`) keeps each seed's runs in a folder of their own, and a
    schedule other than constant (default: LR_SCHEDULE) too."""
    schedule = schedule or LR_SCHEDULE
    return common.TMP / ("rank_parity_quick" if quick else "rank_parity") / (
        f"steps{steps}" + ("" if seed is None else f"_seed{seed}") + ("" if schedule == "constant" else f"_{schedule}"))


# ----------------------------------------------------------------------------- jobs


def job_id(side: str, lr: float, rank: int | None = None) -> str:
    if side == "rslora" and rank == 1:
        side = "qlora"   # alpha/sqrt(1) = alpha/1: at rank 1 the two dedicated sides are the same run
    return f"{side}{'' if rank is None else f'-r{rank}'}-lr{lr:g}"


def job_list(sides: list[str], lrs: list[float], ranks: list[int] | None = None) -> list[dict]:
    """Training jobs in priority order (lr outermost, in the order given); dedicated sides at `ranks`."""
    jobs = []
    if "shipped" in sides and TODAY["lr"] not in lrs:
        jobs.append({"id": job_id("shipped", TODAY["lr"]), "side": "shipped", "rank": None, "lr": TODAY["lr"]})
    for lr in lrs:
        for side in sides:
            if side in DEDICATED:
                jobs += [{"id": job_id(side, lr, r), "side": side, "rank": r, "lr": lr} for r in (ranks or RANKS)
                         if job_id(side, lr, r) == job_id(side, lr, r).replace("qlora", side)]
            elif side in RECIPES:
                jobs.append({"id": job_id(side, lr), "side": side, "rank": None, "lr": lr})
    return jobs


def queue_path(steps: int, quick: bool, seed: int | None = None) -> Path:
    return root(steps, quick, seed) / "queue.json"


def read_queue(steps: int, quick: bool, seed: int | None = None) -> list[dict]:
    path = queue_path(steps, quick, seed)
    return json.loads(path.read_text()) if path.is_file() else []


def queue_phase(args) -> None:
    """Add jobs to the queue the workers read before each job (--replace: start the queue afresh).
    Re-planning while workers run is how the grid is steered: central lrs first, then edges where needed."""
    path = queue_path(args.steps, args.quick, args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    queue = [] if args.replace else read_queue(args.steps, args.quick, args.seed)
    known = {j["id"] for j in queue}
    new = [j for j in job_list(args.sides, args.lrs, args.ranks) if j["id"] not in known]
    queue = (new + queue) if args.front else (queue + new)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(queue, indent=1))
    tmp.replace(path)
    done = {j["job"]["id"] for j in load_jobs(args.steps, args.quick, args.seed)}
    print(f"queue: {len(queue)} jobs ({len(new)} added), {len([j for j in queue if j['id'] not in done])} not done")


def claim(folder: Path, job: dict) -> bool:
    """Atomically take a job; a claim whose process is gone is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{job['id']}.json").exists():
        return False
    path = folder / f"{job['id']}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            path.unlink(missing_ok=True)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class Diverged(Exception):
    pass


def divergence_guard(first: list[float], step: int, loss: float) -> None:
    """Stop a run whose loss is not finite, or has climbed well above where it started."""
    if not first:
        first.append(loss)
    if not math.isfinite(loss) or (step >= 10 and loss > 1.5 * first[0]):
        raise Diverged(f"loss {loss:.3f} at step {step} (first {first[0]:.3f})")


# ----------------------------------------------------------------------------- evaluation


def eval_items(quick: bool, full: bool) -> dict:
    from core.data import load_eval_set

    n = (8 if full else 4) if quick else (None if full else SEARCH_PROMPTS)
    return {name: load_eval_set(path).items[:n] for name, path in SETS.items()}


def held_out_start(quick: bool) -> int:
    """Index of the first prompt of each set that the lr search never saw."""
    return 4 if quick else SEARCH_PROMPTS


def held_out_items(quick: bool) -> dict:
    """The prompts the lr search never saw: final numbers free of the bias of picking the best lr on them."""
    from core.data import load_eval_set

    first = held_out_start(quick)
    return {name: load_eval_set(path).items[first:] for name, path in SETS.items()}


def nll_of(model, tokenizer, items) -> dict:
    from core.evaluation.sweep import measure_nll

    pairs = measure_nll(model, tokenizer, items, batch_size=8)
    sums, counts = [s for s, _ in pairs], [c for _, c in pairs]
    return {"nll": sum(sums) / sum(counts), "sums": sums, "counts": counts}


def evaluate_ranks(model, tokenizer, items: dict, ranks: list[int], fixed_rank: int | None = None) -> dict:
    """{set: {rank: {nll, sums, counts}}} by set_rank on the loaded model (or, for a PEFT model, its one rank)."""
    from core.qdylora import set_rank

    model.eval()
    out = {}
    for name, its in items.items():
        out[name] = {}
        if fixed_rank is not None:
            out[name][str(fixed_rank)] = nll_of(model, tokenizer, its)
            continue
        for b in ranks:
            set_rank(model, b)
            out[name][str(b)] = nll_of(model, tokenizer, its)
    return out


def peft_to_ours(peft_model) -> dict:
    """PEFT LoRA tensors → our '<module>.lora_A' / '.lora_B' keys."""
    state = {}
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module, kind = name.split(".lora_")
            module = module.removeprefix("base_model.model.")
            state[f"{module}.lora_{kind[0]}"] = param.detach().float().cpu().contiguous()
    return state


class AdapterBench:
    """One NF4 base with r_max-16 QDyLoRA layers into which any saved adapter is loaded (zero-padded)."""

    def __init__(self, steps: int, quick: bool, r_max: int = 16):
        from core.models import load_base_model
        from core.qdylora import QDyLoRAConfig, inject_qdylora
        from core.train import TrainConfig

        cfg = TrainConfig(out=str(root(steps, quick) / "unused"), r_max=r_max, **shared_config(steps, quick))
        self.model, self.tokenizer, _ = load_base_model(cfg.model_spec())
        inject_qdylora(self.model, QDyLoRAConfig(r_max=r_max, alpha=16.0))
        self.r_max = r_max

    def load(self, state: dict, scale_rule: str, alpha: float = 16.0) -> None:
        import torch

        from core.qdylora import qdylora_layers

        with torch.no_grad():
            for name, layer in qdylora_layers(self.model).items():
                a, b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer.lora_A[: a.shape[0]] = a
                layer.lora_B[:, : b.shape[1]] = b
                layer.scale_rule, layer.alpha = scale_rule, alpha


def svd_state(state: dict, scale_rule: str, r_max: int = 16) -> tuple[dict, str]:
    from core.qdylora import QDyLoRAConfig
    from core.qdylora.truncation import inference_adapter_state, inference_config

    trained = QDyLoRAConfig(r_max=r_max, alpha=16.0, scale=scale_rule, method="svd")
    return inference_adapter_state(state, trained), inference_config(trained).scale


# ----------------------------------------------------------------------------- train phase


def run_job(job: dict, steps: int, quick: bool, items: dict, folder: Path, seed: int | None = None) -> dict:
    """Train one job, save its adapter, measure its ranks on the search subsets."""
    from safetensors.torch import save_file

    from core.qdylora.inject import adapter_state_dict
    from core.train import TrainConfig, Trainer

    out = root(steps, quick, seed) / "runs" / job["id"]
    shutil.rmtree(out, ignore_errors=True)
    first: list[float] = []
    step_s: list[float] = []
    t0 = time.perf_counter()
    result = {"job": job, "steps": steps, "started": common.machine_info()["date"], "loadavg_start": common.loadavg()}
    try:
        if job["side"] in DEDICATED:
            cfg = TrainConfig(out=str(out), r_max=job["rank"], lr=job["lr"], **shared_config(steps, quick, seed))
            trainer = common.PeftLoRATrainer(cfg, rank=job["rank"], use_rslora=job["side"] == "rslora")

            def on_step(s, loss, dt):
                step_s.append(dt)
                divergence_guard(first, s, loss)

            losses = trainer.train(on_step=on_step)
            model, tokenizer = trainer.model, trainer.tokenizer
            state = peft_to_ours(model)
            scale_rule, ranks, fixed = DEDICATED[job["side"]], [job["rank"]], job["rank"]
        else:
            cfg = TrainConfig(out=str(out), r_max=max(RANKS), lr=job["lr"], **(shared_config(steps, quick, seed) | RECIPES[job["side"]]))
            stamps: list[float] = []

            def on_event(e):
                if e.get("event") == "step":
                    stamps.append(e["time"])
                    divergence_guard(first, e["step"], e["loss"])

            trainer = Trainer(cfg, on_event=on_event)
            try:
                trainer.setup()
                trainer.train()
            finally:
                trainer.cleanup()
            losses = trainer.losses
            step_s = [b - a for a, b in zip(stamps, stamps[1:])]
            model, tokenizer = trainer.model, trainer.tokenizer
            state = adapter_state_dict(model)
            # A seed study also measures ranks between the powers of two (a recipe drawing only those must not lose them).
            scale_rule, ranks, fixed = cfg.scale, (RANKS if seed is None else sorted(RANKS + BETWEEN_RANKS)), None
            result["histogram"] = trainer.histogram
        train_s = time.perf_counter() - t0
        adapters = root(steps, quick, seed) / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        save_file(state, str(adapters / f"{job['id']}.safetensors"))
        result |= {"train_s": train_s, "median_step_s": common.med(step_s), "losses": losses, "scale_rule": scale_rule,
                   "evals": evaluate_ranks(model, tokenizer, items, ranks, fixed)}
        if job["side"] in DEDICATED and job["rank"] == max(RANKS) and seed is None:
            del trainer, model
            gc.collect()
            bench = AdapterBench(steps, quick)
            bench.load(*svd_state(state, scale_rule))
            result["svd_evals"] = evaluate_ranks(bench.model, bench.tokenizer, items, RANKS)
    except Diverged as exc:
        result |= {"diverged": str(exc), "train_s": time.perf_counter() - t0}
    result |= {"loadavg_end": common.loadavg(), "eval_s": time.perf_counter() - t0 - result["train_s"]}
    shutil.rmtree(out, ignore_errors=True)
    tmp = folder / f"{job['id']}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(folder / f"{job['id']}.json")
    (folder / f"{job['id']}.claim").unlink(missing_ok=True)
    return result


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder = root(args.steps, args.quick, args.seed) / "jobs"
    # A seed study's lrs were picked on the search subsets already: its runs are measured on the whole sets.
    items = eval_items(args.quick, full=args.seed is not None)
    while True:
        job = next((j for j in read_queue(args.steps, args.quick, args.seed) if claim(folder, j)), None)
        if job is None:
            return
        common.log(f"[worker {os.getpid()}] {job['id']}: training {args.steps} steps")
        res = run_job(job, args.steps, args.quick, items, folder, args.seed)
        summary = res.get("diverged") or ", ".join(
            f"{s} " + "/".join(f"{v['nll']:.3f}" for v in res["evals"][s].values()) for s in res["evals"])
        common.log(f"[worker {os.getpid()}] {job['id']}: {res['train_s']:.0f}s train, {summary}")
        gc.collect()


def train_phase(args) -> None:
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if not read_queue(args.steps, args.quick, args.seed):
        queue_phase(args)
    cmd = [sys.executable, __file__, "worker", "--steps", str(args.steps), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    cmd += [] if args.seed is None else ["--seed", str(args.seed)]
    cmd += ["--schedule", LR_SCHEDULE]
    common.log(f"{len(read_queue(args.steps, args.quick, args.seed))} jobs queued, {args.workers} workers x {args.threads} thread(s)")
    procs = [subprocess.Popen(cmd, env=env) for _ in range(args.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    if args.seed is None:
        base_phase(args)


def base_phase(args) -> None:
    """The base model's NLL on the search subsets and the full sets (rank 0), once."""
    path = root(args.steps, args.quick) / "base.json"
    if path.is_file():
        return
    bench = AdapterBench(args.steps, args.quick)
    out = {"search": evaluate_ranks(bench.model, bench.tokenizer, eval_items(args.quick, False), [0]),
           "full": evaluate_ranks(bench.model, bench.tokenizer, eval_items(args.quick, True), [0])}
    path.write_text(json.dumps(out))


# ----------------------------------------------------------------------------- final phase


def load_jobs(steps: int, quick: bool, seed: int | None = None, schedule: str | None = None) -> list[dict]:
    folder = root(steps, quick, seed, schedule) / "jobs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def search_table(jobs: list[dict]) -> dict:
    """{set: {side: {lr: {rank: nll}}}} from the search subsets (diverged runs: inf)."""
    table: dict = {}
    for res in jobs:
        job = res["job"]
        derived = [(job["side"], res.get("evals"))]
        if job["side"] == "qlora" and job["rank"] == 1:
            derived.append(("rslora", res.get("evals")))     # the same run (see job_id)
        if "svd_evals" in res:
            derived.append((next(k for k, v in SVD_OF.items() if v == job["side"]), res["svd_evals"]))
        for side, evals in derived:
            for set_name in SETS:
                cell = table.setdefault(set_name, {}).setdefault(side, {}).setdefault(job["lr"], {})
                if res.get("diverged"):
                    for r in ([job["rank"]] if side in DEDICATED else RANKS):
                        cell[r] = math.inf
                    continue
                for r, v in evals[set_name].items():
                    cell[int(r)] = v["nll"]
    return table


def best_lrs(table: dict) -> dict:
    """{set: {side: {rank: lr}}}: dedicated sides per rank, one-run sides one lr (lowest mean NLL over ranks)."""
    out: dict = {}
    for set_name, sides in table.items():
        for side, by_lr in sides.items():
            if side in DEDICATED:
                choice = {}
                for r in RANKS:
                    cands = [(v[r], lr) for lr, v in by_lr.items() if r in v]
                    if cands:
                        choice[r] = min(cands)[1]
            else:
                complete = [(sum(v[r] for r in RANKS) / len(RANKS), lr) for lr, v in by_lr.items() if all(r in v for r in RANKS)]
                if not complete:
                    continue
                lr = min(complete)[1]
                choice = {r: lr for r in RANKS}
            out.setdefault(set_name, {})[side] = choice
    return out


def one_lr_choice(table: dict, sides: list[str]) -> dict:
    """{side: lr} for one-run recipes: the one lr a default must use on every set (lowest mean NLL over sets and ranks)."""
    out = {}
    for side in sides:
        if side in DEDICATED or side in SVD_OF:
            continue
        per_set = [table.get(s, {}).get(side, {}) for s in SETS]
        lrs = set.intersection(*(set(by_lr) for by_lr in per_set)) if all(per_set) else set()
        cands = [(sum(sum(by_lr[lr][r] for r in RANKS) / len(RANKS) for by_lr in per_set) / len(per_set), lr)
                 for lr in lrs if all(all(r in by_lr[lr] for r in RANKS) for by_lr in per_set)]
        if cands:
            out[side] = min(cands)[1]
    return out


def final_phase(args) -> None:
    """Full-set NLL and ROUGE-L of each side's best-lr models, paired gaps, JSON + chart."""
    import torch
    from safetensors.torch import load_file

    from core.evaluation.metrics import rouge_l_scores
    from core.evaluation.stats import bootstrap_mean_ci, bootstrap_ratio_ci
    from core.qdylora import set_rank
    from core.runs import generate
    from rank_search import paired_gap

    torch.set_num_threads(args.threads)
    info = common.machine_info()
    jobs = load_jobs(args.steps, args.quick)
    table = search_table(jobs)
    wanted = set(args.sides) | set(DEDICATED) | set(SVD_OF)   # dedicated peers and their SVD cuts always
    choice = {set_name: {side: c for side, c in sides.items() if side in wanted} for set_name, sides in best_lrs(table).items()}
    base = json.loads((root(args.steps, args.quick) / "base.json").read_text())
    full = held_out_items(args.quick)
    cache_path = root(args.steps, args.quick) / "final_cache_held_out.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    bench = AdapterBench(args.steps, args.quick)
    adapters = root(args.steps, args.quick) / "adapters"
    # Today's defaults (shipped at lr 2e-4) may not have been run at this length.
    has_today = (adapters / f"{job_id('shipped', TODAY['lr'])}.safetensors").is_file()
    one_lr = one_lr_choice(table, [s for s in args.sides if s in RECIPES])
    needed = sorted({(side, lr, r) for sides in choice.values() for side, by_rank in sides.items() for r, lr in by_rank.items()}
                    | {(side, lr, r) for side, lr in one_lr.items() for r in RANKS}
                    | ({("shipped", TODAY["lr"], r) for r in RANKS} if has_today else set()))
    for side, lr, r in needed:
        key = f"{side}|{lr:g}|{r}"
        if key in cache:
            continue
        if side == "rslora" and r == 1 and f"qlora|{lr:g}|1" in cache:
            cache[key] = cache[f"qlora|{lr:g}|1"]   # alpha/sqrt(1) = alpha/1: the same run (see job_id)
            continue
        if side in DEDICATED:
            bench.load(load_file(str(adapters / f"{job_id(side, lr, r)}.safetensors")), DEDICATED[side])
        elif side in SVD_OF:
            src = SVD_OF[side]
            bench.load(*svd_state(load_file(str(adapters / f"{job_id(src, lr, max(RANKS))}.safetensors")), DEDICATED[src]))
        else:
            rule = next(j["scale_rule"] for j in jobs if j["job"]["id"] == job_id(side, lr))
            bench.load(load_file(str(adapters / f"{job_id(side, lr)}.safetensors")), rule)
        set_rank(bench.model, r)
        bench.model.eval()
        entry = {}
        for set_name, items in full.items():
            nll = nll_of(bench.model, bench.tokenizer, items)
            gen = items[:GEN_PROMPTS if not args.quick else 4]
            answers = generate(bench.model, bench.tokenizer, [it.prompt for it in gen], max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
            entry[set_name] = nll | {"rouge": rouge_l_scores(answers, [it.reference for it in gen]), "answers": answers}
        cache[key] = entry
        cache_path.write_text(json.dumps(cache))
        common.log(f"final {key}: " + ", ".join(f"{s} NLL {v['nll']:.3f} ROUGE-L {sum(v['rouge']) / len(v['rouge']):.3f}" for s, v in entry.items()))

    def summary(entry: dict) -> dict:
        ci = bootstrap_ratio_ci(entry["sums"], entry["counts"], n_resamples=2000, seed=0)
        rouge = bootstrap_mean_ci(entry["rouge"], n_resamples=2000, seed=0)
        return {"nll": ci.mean, "nll_lo": ci.lo, "nll_hi": ci.hi, "rouge_l": rouge.mean, "rouge_l_lo": rouge.lo, "rouge_l_hi": rouge.hi}

    per_set = {}
    for set_name, sides in choice.items():
        rows = {}
        for side, by_rank in sides.items():
            rows[side] = {r: {"lr": lr} | summary(cache[f"{side}|{lr:g}|{r}"][set_name]) for r, lr in by_rank.items()}
        if has_today:
            rows["today"] = {r: {"lr": TODAY["lr"]} | summary(cache[f"shipped|{TODAY['lr']:g}|{r}"][set_name]) for r in RANKS}
        peers = {}
        for r in RANKS:
            cands = [(rows[s][r]["nll"], s) for s in DEDICATED if s in rows and r in rows[s]]
            if cands:
                peers[r] = min(cands)[1]
        def gap_to_peer(key: str, r: int) -> dict:
            ours = cache[key][set_name]
            theirs = cache[f"{peers[r]}|{sides[peers[r]][r]:g}|{r}"][set_name]
            gap = paired_gap({"nll_sums": ours["sums"], "nll_counts": ours["counts"]},
                             {"nll_sums": theirs["sums"], "nll_counts": theirs["counts"]}, 2000)
            diff = [a - b for a, b in zip(ours["rouge"], theirs["rouge"])]
            return {"peer": peers[r], "nll_gap": gap, "rouge_diff": vars(bootstrap_mean_ci(diff, n_resamples=2000, seed=0))}

        gaps = {}
        today = {r: TODAY["lr"] for r in RANKS}
        for side, by_rank in [*sides.items(), *([("today", today)] if has_today else [])]:
            if side in DEDICATED:
                continue
            gaps[side] = {r: gap_to_peer(f"{'shipped' if side == 'today' else side}|{lr:g}|{r}", r)
                          for r, lr in by_rank.items() if r in peers}
        # A default has one lr for every set: each recipe at its one best lr (one_lr_choice), the same peers.
        gaps_one_lr = {side: {r: gap_to_peer(f"{side}|{lr:g}|{r}", r) | {"lr": lr} | summary(cache[f"{side}|{lr:g}|{r}"][set_name])
                              for r in RANKS if r in peers} for side, lr in one_lr.items()}
        base_full = base["full"][set_name]["0"]
        first = len(base_full["sums"]) - len(full[set_name])     # the held-out rest of the full set
        per_set[set_name] = {"rows": rows, "best_peer": peers, "gaps": gaps, "gaps_one_lr": gaps_one_lr,
                             "base_nll": sum(base_full["sums"][first:]) / sum(base_full["counts"][first:]),
                             "prompts": len(full[set_name]), "prompts_in_lr_search": SEARCH_PROMPTS}
    cost = {side: {"median_step_s": common.med([j["median_step_s"] for j in jobs if j["job"]["side"] == side and j.get("median_step_s")]),
                   "train_s_median": common.med([j["train_s"] for j in jobs if j["job"]["side"] == side and not j.get("diverged")])}
            for side in sorted({j["job"]["side"] for j in jobs})}
    name = "rank_search_variants_quick" if args.quick else ("rank_search_variants" if args.steps == 40 else f"rank_search_variants_{args.steps}")
    common.write_result(name, {
        "config": {"steps": args.steps, "ranks": RANKS, "lr_grid": sorted({j["job"]["lr"] for j in jobs}),
                   "shared": shared_config(args.steps, args.quick), "recipes": RECIPES, "search_prompts_per_set": SEARCH_PROMPTS,
                   "final_prompts": "the held-out rest of each set (not used to pick learning rates)",
                   "gen_prompts_per_set": GEN_PROMPTS, "max_new_tokens": MAX_NEW_TOKENS, "today": TODAY, "target_gap": TARGET_GAP},
        "search": {s: {side: {f"{lr:g}": v for lr, v in by_lr.items()} for side, by_lr in sides.items()} for s, sides in table.items()},
        "best_lr": choice, "one_lr": one_lr, "base_search": {s: v["0"]["nll"] for s, v in base["search"].items()},
        "final": per_set, "cost_during_grid": cost,
        "diverged": sorted(j["job"]["id"] for j in jobs if j.get("diverged")),
        "answers": {k: {s: v[s]["answers"][:5] for s in v} for k, v in cache.items()},
        "jobs": [{k: v for k, v in j.items() if k not in ("evals", "svd_evals", "losses")} | {"final_loss": (j.get("losses") or [None])[-1]}
                 for j in jobs],
    }, info)
    try:
        import plot

        plot.main([name])
    except Exception as exc:  # a chart must never lose the numbers
        print(f"plot failed: {exc}")


def parent_run_folder(side: str, lr: float, steps: int, quick: bool, seed: int | None = None) -> Path:
    """A run folder (config, adapter, status completed) for a recipe job of the grid, so that the
    library's `refine` can start from it exactly as a user's refine starts from their run."""
    from core import runstate
    from core.models import resolve_model_path
    from core.train import TrainConfig

    folder = root(steps, quick, seed) / "parents" / job_id(side, lr)
    if (folder / "status.json").is_file():
        return folder
    if side in SVD_OF:   # the dedicated r_max run, read as the svd method reads it
        src = SVD_OF[side]
        recipe, adapter = {"method": "svd", "scale": DEDICATED[src]}, job_id(src, lr, max(RANKS))
    else:
        recipe, adapter = RECIPES[side], job_id(side, lr)
    cfg = TrainConfig(out=str(folder), r_max=max(RANKS), lr=lr, **(shared_config(steps, quick, seed) | recipe))
    name, path = resolve_model_path(cfg.model)
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    shutil.copy(root(steps, quick, seed) / "adapters" / f"{adapter}.safetensors", folder / "adapter" / "adapter.safetensors")
    runstate.write_json_atomic(folder / "config.json", {
        "train": cfg.to_dict(), "qdylora": cfg.qdylora_config().to_dict(), "adapted_modules": [],
        "model": {"name": name, "path": path, "quant": cfg.quant, "device": "cpu", "compute_dtype": "float32"}})
    runstate.write_status(folder, "completed", step=steps, total_steps=steps)
    return folder


def refine_phase(args) -> None:
    """How many `qdylora refine` steps bring a recipe's rank b to a dedicated run's quality:
    refine each rank from the recipe's run at its lr, measuring both held-out sets at the listed steps."""
    import torch

    from core.qdylora import set_rank
    from core.refine import refine_config
    from core.train import Trainer

    torch.set_num_threads(args.threads)
    side, parent_lr = args.refine_side, args.refine_parent_lr
    parent = parent_run_folder(side, parent_lr, args.steps, args.quick, args.seed)
    full = held_out_items(args.quick)  # comparable with the final numbers
    checkpoints = sorted(int(x) for x in args.refine_steps.split(","))
    folder = root(args.steps, args.quick, args.seed)
    out_path = folder / f"refine_{job_id(side, parent_lr)}_lr{args.refine_lr:g}.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for b in [int(x) for x in args.refine_ranks.split(",")]:
        if str(b) in results:
            continue
        out = folder / "runs" / f"refine-{job_id(side, parent_lr)}-r{b}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = refine_config(parent, b, steps=max(checkpoints), out=out, lr=args.refine_lr)
        holder, curve = {}, {}

        def on_event(e, b=b):
            if e.get("event") == "step" and e["step"] in checkpoints:
                trainer = holder["t"]
                curve[e["step"]] = {k: v[str(b)]["nll"] for k, v in evaluate_ranks(trainer.model, trainer.tokenizer, full, [b]).items()}
                common.log(f"refine {side} rank {b}, step {e['step']}: {curve[e['step']]}")

        trainer = Trainer(cfg, on_event=on_event)
        holder["t"] = trainer
        try:
            trainer.setup()
            set_rank(trainer.model, b)
            curve[0] = {k: v[str(b)]["nll"] for k, v in evaluate_ranks(trainer.model, trainer.tokenizer, full, [b]).items()}
            t0 = time.perf_counter()
            trainer.train()
            results[str(b)] = {"curve": curve, "train_s": time.perf_counter() - t0, "lr": args.refine_lr}
        finally:
            trainer.cleanup()
            shutil.rmtree(out, ignore_errors=True)
        out_path.write_text(json.dumps(results))
    print(json.dumps(results, indent=1))


def status_phase(args) -> None:
    jobs = read_queue(args.steps, args.quick, args.seed)
    done = {j["job"]["id"] for j in load_jobs(args.steps, args.quick, args.seed)}
    print(f"{len(done & {j['id'] for j in jobs})} of {len(jobs)} queued jobs done; not done: "
          + ", ".join(j["id"] for j in jobs if j["id"] not in done))
    table = search_table(load_jobs(args.steps, args.quick, args.seed))
    for set_name, sides in table.items():
        print(f"\n== {set_name} (search subset NLL; rank columns {RANKS})")
        for side in sorted(sides):
            for lr in sorted(sides[side]):
                v = sides[side][lr]
                print(f"{side:>18} lr {lr:<7g} " + " ".join(f"{v[r]:7.3f}" if r in v else "      -" for r in RANKS))


SIDE_ORDER = ["svd_qlora", "svd_rslora", "rowinv", "rowinv_nodrop", "rowinv_k4", "rowinv_high", "rowsqrt", "const", "sqrt", "sqrt_high", "sqrt_k4", "sqrt_high_k4", "const_k4",
              "const_high_k4", "shipped", "today"]


def _pct(d: dict) -> str:
    return f"{d['gap'] * 100:+.1f} % [{d['lo'] * 100:+.1f}, {d['hi'] * 100:+.1f}]"


def report_phase(args) -> None:
    """The final numbers as Markdown tables (for bench/README.md §6), from the result JSON."""
    name = "rank_search_variants_quick" if args.quick else ("rank_search_variants" if args.steps == 40 else f"rank_search_variants_{args.steps}")
    res = json.loads((common.RESULTS / f"{name}.json").read_text())
    for set_name, fin in res["final"].items():
        sides = [s for s in SIDE_ORDER if s in fin["gaps"]]
        print(f"\n**{set_name}** ({fin['prompts']} held-out prompts; base model NLL {fin['base_nll']:.3f}); "
              "NLL gap to the best dedicated run at that rank, paired 95 % CI:\n")
        print("| rank | best dedicated (lr) | its NLL [95 % CI] | " + " | ".join(
            f"{s} (lr {fin['rows'][s][next(iter(fin['rows'][s]))]['lr']:g})" for s in sides) + " |")
        print("|---" * (3 + len(sides)) + "|")
        for r in map(str, RANKS):
            peer = fin["best_peer"].get(r)
            if peer is None:
                continue
            row = fin["rows"][peer][r]
            cells = [_pct(fin["gaps"][s][r]["nll_gap"]) if r in fin["gaps"][s] else "—" for s in sides]
            print(f"| {r} | {peer} ({row['lr']:g}) | {row['nll']:.3f} [{row['nll_lo']:.3f}, {row['nll_hi']:.3f}] | " + " | ".join(cells) + " |")
        print("\nROUGE-L (mean over the generated answers; difference to the best dedicated run, 95 % CI):\n")
        print("| rank | best dedicated | " + " | ".join(sides) + " |")
        print("|---" * (2 + len(sides)) + "|")
        for r in map(str, RANKS):
            peer = fin["best_peer"].get(r)
            if peer is None:
                continue
            cells = []
            for s in sides:
                g = fin["gaps"][s].get(r)
                if g is None:
                    cells.append("—")
                    continue
                own = fin["rows"][s][r]["rouge_l"]
                d = g["rouge_diff"]
                cells.append(f"{own:.3f} ({d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])")
            print(f"| {r} | {fin['rows'][peer][r]['rouge_l']:.3f} | " + " | ".join(cells) + " |")
        one = fin.get("gaps_one_lr") or {}
        one_sides = [s for s in SIDE_ORDER if s in one]
        if one_sides:
            print(f"\nOne lr for both sets (what a default uses), {set_name}: NLL gap [95 % CI] / ROUGE-L difference [95 % CI]:\n")
            print("| rank | " + " | ".join(f"{s} (lr {res['one_lr'][s]:g})" for s in one_sides) + " |")
            print("|---" * (1 + len(one_sides)) + "|")
            for r in map(str, RANKS):
                if r not in fin["best_peer"]:
                    continue
                cells = [f"{_pct(one[s][r]['nll_gap'])} / {one[s][r]['rouge_diff']['mean']:+.3f} "
                         f"[{one[s][r]['rouge_diff']['lo']:+.3f}, {one[s][r]['rouge_diff']['hi']:+.3f}]" if r in one[s] else "—"
                         for s in one_sides]
                print(f"| {r} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "worker", "queue", "final", "status", "refine", "report"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--sides", default=",".join([*DEDICATED, *RECIPES]), help="dedicated sides (qlora, rslora) and recipe names")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LR_GRID))
    p.add_argument("--ranks", default=None, help="ranks of the dedicated runs to queue (default: all)")
    p.add_argument("--replace", action="store_true", help="queue: start a new queue instead of adding")
    p.add_argument("--front", action="store_true", help="queue: put the new jobs first")
    p.add_argument("--refine-side", default="const", help="refine: the recipe whose run is refined")
    p.add_argument("--refine-parent-lr", type=float, default=3e-3, help="refine: that run's lr in the grid")
    p.add_argument("--refine-lr", type=float, default=3e-3, help="refine: the lr of the refine runs")
    p.add_argument("--refine-ranks", default="1,4", help="refine: ranks to polish")
    p.add_argument("--refine-steps", default="5,10,20", help="refine: steps at which to measure (the last is the run's length)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed study: train/queue/worker/status/refine in a folder of this seed's own, measured on the whole sets")
    p.add_argument("--schedule", default="constant", choices=LR_SCHEDULES,
                   help="lr schedule of every side after warm-up (a non-constant grid lives in a folder of its own)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    global LR_SCHEDULE
    LR_SCHEDULE = args.schedule
    if args.seed is not None and args.phase in ("final", "report"):
        raise SystemExit(f"--seed is for train/queue/worker/status/refine; the {args.phase} phase reads the lr grid (seed {DEFAULT_SEED})")
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in args.sides if s not in DEDICATED and s not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown sides {unknown}; known: {', '.join([*DEDICATED, *RECIPES])}")
    args.lrs = [float(x) for x in args.lrs.split(",") if x]
    args.ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else None
    if args.quick:
        args.steps = min(args.steps, 2)
    {"train": train_phase, "worker": worker, "queue": queue_phase, "final": final_phase, "status": status_phase,
     "refine": refine_phase, "report": report_phase}[args.phase](args)


if __name__ == "__main__":
    main()
