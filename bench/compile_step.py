"""What torch.compile would give the training step on this machine (issue 12, §4.3).

The step spends most of its time outside its matrix products (roofline.py: products-only
ceiling), in many small passes over memory: norms, SiLU·up, rotary, dropout masks, adds.
Fusing those passes is what `torch.compile`'s CPU backend (inductor, C++ through the
system compiler) does. This script measures, for the default model and the trainer as it
is (packing, fused loss, r_max 16, batch 4 x 256):

- the compile cost: the first two passes over the sampled ranks (1, 2, 4, 8, 16) with
  every decoder layer compiled, minus two eager passes; by default with an empty compile
  cache (a first run), with --warm-cache on inductor's shared cache (a later run);
- the step time per rank, eager and compiled, in rounds that alternate which goes first,
  and the fraction of the matmul bound (roofline.py's definition) that each reaches;
- the steps a run needs before the compile pays for itself;
- that both compute the same thing: after the timed rounds, the compiled model gets the
  eager model's adapters and both losses are compared (eval mode, ranks 1 and r_max).

The compiled side is what `TrainConfig.compile` does (core/compiling.py): only the decoder
layers are compiled (the head and loss are core/lm_loss.py's chunked loss), with a higher
recompile limit than dynamo's 8, which the ranks' graphs would otherwise exceed (the
first tries, before that setting, fell back to eager for most ranks).

    .venv/bin/python bench/compile_step.py [--quick] [--rounds N] [--quant nf4|none]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

import roofline  # noqa: E402
from core.compiling import compile_decoder_layers  # noqa: E402
from core.qdylora import set_rank  # noqa: E402
from core.qdylora.inject import adapter_state_dict, load_adapter_state_dict  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402

RANKS = (16, 1, 2, 4, 8)


def make_trainer(args, name: str) -> Trainer:
    out = common.TMP / f"compile_step_{name}"
    shutil.rmtree(out, ignore_errors=True)
    model = str(common.quick_llama_folder("compile_tiny_model")) if args.quick else "default"
    tr = Trainer(TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=model, quant=args.quant, r_max=16,
                             batch_size=4, max_length=args.max_length, steps=10_000, seed=42))
    tr.setup()
    return tr


def timed_pass(trainer: Trainer, ranks) -> dict[int, float]:
    times = {}
    for b in ranks:
        with common.Timer() as t:
            trainer.train_step(b)
        times[b] = t.s
    return times


def eval_losses(trainer: Trainer, ranks) -> dict[int, float]:
    batch = trainer._micro_batch(0)
    trainer.model.eval()
    out = {}
    with torch.no_grad():
        for b in ranks:
            set_rank(trainer.model, b)
            out[b] = float(trainer._loss(batch).loss)
    trainer.model.train()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 1 round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warm-cache", action="store_true",
                   help="use inductor's shared on-disk cache (what a later run on this machine pays); by default a "
                        "fresh, empty one (what a first run pays)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if not args.warm_cache:  # read by inductor when it first compiles, so setting it here is in time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_step_cache_")
    if args.quick:
        args.rounds, args.max_length = 1, 64
    info = common.machine_info()
    print(info)
    dev = common.device()
    eager, compiled = make_trainer(args, "eager"), make_trainer(args, "compiled")
    batch = eager._micro_batch(0)
    processed = int(batch["input_ids"].numel())
    flops = roofline.flop_model(eager.model, 16, int(batch["input_ids"].shape[1]))
    try:
        first_eager = timed_pass(eager, RANKS)
        n_layers = compile_decoder_layers(compiled.model)
        first_compiled = timed_pass(compiled, RANKS)
        second_compiled = timed_pass(compiled, RANKS)  # recompiles a first pass left (none expected)
        compile_s = sum(first_compiled.values()) + sum(second_compiled.values()) - 2 * sum(first_eager.values())
        common.log(f"{n_layers} layers compiled: first pass {sum(first_compiled.values()):.1f} s + second "
                   f"{sum(second_compiled.values()):.1f} s against eager {sum(first_eager.values()):.1f} s per pass")
        rounds = []
        for r in range(args.rounds):
            gflops = roofline.matmul_gflops(2048, 5, dev)
            row = {"gflops": gflops, "eager": {}, "compiled": {}}
            for i, b in enumerate(RANKS):
                order = [("eager", eager), ("compiled", compiled)]
                if (r + i) % 2:
                    order.reverse()
                for name, tr in order:
                    row[name][b] = timed_pass(tr, [b])[b]
            row["loadavg"] = common.loadavg()
            rounds.append(row)
            e, c = sum(row["eager"].values()), sum(row["compiled"].values())
            common.log(f"round {r + 1}: a pass over ranks {RANKS}: eager {e:.2f} s, compiled {c:.2f} s (x{e / c:.2f}); "
                       f"matmul {gflops:.0f} GFLOP/s")
        load_adapter_state_dict(compiled.model, adapter_state_dict(eager.model))
        losses = {"eager": eval_losses(eager, (1, 16)), "compiled": eval_losses(compiled, (1, 16))}
    finally:
        for tr in (eager, compiled):
            tr.cleanup()
            shutil.rmtree(tr.run_dir, ignore_errors=True)
        if not args.warm_cache:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    per_rank = {}
    for b in RANKS:
        e = common.med([row["eager"][b] for row in rounds])
        c = common.med([row["compiled"][b] for row in rounds])
        per_rank[b] = {"eager_s": e, "compiled_s": c, "speedup": e / c}
    bound = common.med([row["gflops"] for row in rounds]) * 1e9 / flops["flops_per_token"]
    mean_eager = common.med([sum(row["eager"].values()) for row in rounds]) / len(RANKS)
    mean_compiled = common.med([sum(row["compiled"].values()) for row in rounds]) / len(RANKS)
    saved = mean_eager - mean_compiled
    summary = {
        "compile_s": compile_s,
        "mean_step_s": {"eager": mean_eager, "compiled": mean_compiled},
        "speedup": mean_eager / mean_compiled,
        "speedup_per_round": [sum(row["eager"].values()) / sum(row["compiled"].values()) for row in rounds],
        "fraction_of_bound": {"eager": processed / mean_eager / bound, "compiled": processed / mean_compiled / bound,
                              "eager_at_r16": processed / per_rank[16]["eager_s"] / bound,
                              "compiled_at_r16": processed / per_rank[16]["compiled_s"] / bound},
        "break_even_steps": compile_s / saved if saved > 0 else None,
        "loss_diff": {b: abs(losses["eager"][b] - losses["compiled"][b]) for b in (1, 16)},
    }
    print(f"compile {compile_s:.0f} s; mean step over ranks {RANKS}: eager {mean_eager:.2f} s, compiled {mean_compiled:.2f} s "
          f"(x{summary['speedup']:.2f}); fraction of the bound {summary['fraction_of_bound']['eager']:.1%} -> "
          f"{summary['fraction_of_bound']['compiled']:.1%}; pays for itself after "
          f"{summary['break_even_steps'] or float('inf'):.0f} steps; loss |diff| {summary['loss_diff']}")
    common.write_result(common.result_name(f"compile_step_{args.quant}", args.quick, args.tag), {
        "config": vars(args), "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "inductor's default"),
        "ranks": list(RANKS), "processed_tokens": processed, "bound_tokens_per_s": bound,
        "first_pass_s": {"eager": first_eager, "compiled": first_compiled, "compiled_second": second_compiled},
        "losses": losses, "rounds": rounds, "per_rank": per_rank, "summary": summary}, info)


if __name__ == "__main__":
    main()
