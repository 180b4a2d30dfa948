"""QDyLoRA training step vs a plain PEFT LoRA step, same base, same batch, interleaved.

For each base (NF4 and float32) the script sets up core.train.Trainer (QDyLoRA at r_max)
and a PEFT LoRA model (LoraConfig(r=r_max, lora_alpha=16, dropout 0.05, all block
linears)) on a second copy of the same base, takes one fixed batch (the run's first
micro-batch: batch 4, max length 256), warms each up, then times rounds of

    QDyLoRA at b = r_max | QDyLoRA at a sampled b (the run's RankSampler) | PEFT at r = r_max

in rotating order. Steps are full optimizer steps: core.train.Trainer.train_step for
QDyLoRA (set_rank, forward/backward, clip, UntrainedRowGuard, AdamW, scheduler) and the
same recipe for PEFT. Ratios are taken within a round (side by side), medians reported.

    .venv/bin/python bench/step_time.py [--quick] [--rounds N] [--r-max 16,64] [--quants nf4,none]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets offline env, sys.path)


from core.train import TrainConfig, Trainer  # noqa: E402

TARGET_FIXED = 1.05


def bench_quant(quant: str, r_max: int, rounds: int, warmup: int, batch_size: int, max_length: int) -> dict:
    out = common.TMP / f"step_time_{quant}_r{r_max}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model="default", quant=quant, r_max=r_max,
                      batch_size=batch_size, max_length=max_length, steps=10_000, seed=42)
    common.log(f"[{quant}] loading QDyLoRA trainer and PEFT baseline (r_max {r_max})")
    trainer = Trainer(cfg)
    trainer.setup()
    batch = trainer._micro_batch(0)  # the fixed batch; train_step(…) at step 0 uses exactly this one
    peft = common.PeftLoRATrainer(cfg, rank=r_max, examples=trainer.examples)
    width = int(batch["input_ids"].shape[1])
    tokens = int(batch["attention_mask"].sum())
    n_trainable_qdy = sum(p.numel() for p in trainer.params)
    n_trainable_peft = sum(p.numel() for p in peft.params)

    def qdy_fixed():
        return trainer.train_step(r_max)

    def qdy_sampled():
        b = trainer.sampler.sample()
        trainer.train_step(b)
        return b

    def peft_step():
        return peft.train_step(batch)

    variants = {"qdylora_fixed": qdy_fixed, "qdylora_sampled": qdy_sampled, "peft": peft_step}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {k: [] for k in variants}
    sampled_ranks = []
    ratios_fixed, ratios_sampled = [], []
    names = list(variants)
    for i in range(rounds):
        order = names[i % 3:] + names[: i % 3]
        row = {}
        for name in order:
            with common.Timer() as t:
                ret = variants[name]()
            row[name] = t.s
            times[name].append(t.s)
            if name == "qdylora_sampled":
                sampled_ranks.append(ret)
        ratios_fixed.append(row["qdylora_fixed"] / row["peft"])
        ratios_sampled.append(row["qdylora_sampled"] / row["peft"])
        common.log(f"[{quant}] round {i + 1}/{rounds}: fixed {row['qdylora_fixed']:.2f}s  sampled(b={sampled_ranks[-1]}) "
                   f"{row['qdylora_sampled']:.2f}s  peft {row['peft']:.2f}s  ratio fixed {ratios_fixed[-1]:.3f}")
    result = {
        "quant": quant, "r_max": r_max, "batch_size": batch_size, "max_length": max_length,
        "batch_width": width, "batch_tokens": tokens, "trainable_params_qdylora": n_trainable_qdy,
        "trainable_params_peft": n_trainable_peft, "rounds": rounds, "warmup": warmup,
        "step_s": {k: common.describe(v) for k, v in times.items()},
        "step_s_raw": times, "sampled_ranks": sampled_ranks,
        "ratio_fixed": common.describe(ratios_fixed) | {"median_ci95": common.median_ci(ratios_fixed)},
        "ratio_sampled": common.describe(ratios_sampled) | {"median_ci95": common.median_ci(ratios_sampled)},
        "ratio_fixed_raw": ratios_fixed, "ratio_sampled_raw": ratios_sampled,
    }
    trainer.cleanup()
    del trainer, peft
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 rounds, nf4 only")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r-max", default="16,64", help="comma-separated r_max values (16 = the demo's, 64 = the library default)")
    p.add_argument("--quants", default="nf4,none")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.quants, args.r_max = 2, 1, "nf4", "16"
    info = common.machine_info()
    print(info)
    results = []
    jobs = [(q.strip(), int(r)) for r in args.r_max.split(",") for q in args.quants.split(",") if q.strip()]
    for quant, r_max in jobs:
        res = bench_quant(quant, r_max, args.rounds, args.warmup, args.batch_size, args.max_length)
        results.append(res)
        print(f"{quant} r_max {r_max}: median step QDyLoRA fixed b=r_max {res['step_s']['qdylora_fixed']['median']:.3f}s, "
              f"sampled b {res['step_s']['qdylora_sampled']['median']:.3f}s, PEFT {res['step_s']['peft']['median']:.3f}s; "
              f"median ratio fixed {res['ratio_fixed']['median']:.3f} (target <= {TARGET_FIXED}), "
              f"sampled {res['ratio_sampled']['median']:.3f}; load {common.loadavg()}")
    targets = {
        f"{r['quant']}_r{r['r_max']}_fixed_ratio_le_{TARGET_FIXED}": {"value": r["ratio_fixed"]["median"], "met": r["ratio_fixed"]["median"] <= TARGET_FIXED}
        for r in results
    }
    common.write_result(common.result_name("step_time", args.quick), {"config": vars(args), "results": results, "targets": targets}, info)


if __name__ == "__main__":
    main()
