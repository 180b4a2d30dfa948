"""How close training gets to this machine's matmul speed.

Measured side by side in rounds (one round = a float32 matmul burst, one NF4 training
step, one float32 training step, all on the default model):

- matmul GFLOP/s: median time of float32 n x n matmuls (n = 2048), 2 n^3 FLOPs each;
- training tokens/s: core.train.Trainer.train_step at b = r_max (16) on the run's first
  micro-batch (batch 4, max length 256); tokens = rows x width of the micro-batch as the
  trainer lays it out ("processed": padded, or packed with --batching packed, the
  default) and real tokens ("useful", what train.py logs).

Since issue 12 the trainer computes the output head and the cross-entropy only at the
answer tokens (core/lm_loss.py) and packs short examples into shared rows
(core/packing.py): it does less work than the FLOP count below, which stays the
definition (the work the plain computation needs per token) so that the fraction is
comparable with earlier results. `--batching padded` measures without packing.

The bound (precisely):

    FLOPs per token = 4 * N_mm + 6 * P_adapter(r_max)

    N_mm      = weights that take part in a matmul per token: every block linear
                (in x out) plus the output head (hidden x vocab); the embedding lookup
                and norms are not matmuls. Forward costs 2 * N_mm; the backward pass
                needs input gradients through every frozen weight (2 * N_mm) but no
                weight gradients for them.
    P_adapter = adapter parameters at rank r_max (forward 2P, input grad 2P, weight grad 2P).

    bound tokens/s = matmul GFLOP/s * 1e9 / FLOPs per token.

Not counted: attention score/value products (~12 * layers * hidden * T per token with
full T x T matrices; reported separately as attention_flops_per_token), NF4
dequantization, softmax, norms, activations, the optimizer. Fraction = measured / bound.

The step's own products (`--no-products` skips it): one training step per base is
profiled with its operators' input shapes, and every matrix product it ran (aten::mm,
addmm, addmm_, bmm) is replayed alone at its own shapes in float32, the same number of
times: once in rounds where the products take turns (each finds its operands out of
cache, as in the step) and once back to back (warm caches: the kinder ceiling). Their
summed median time is what the step would take if everything but its products took no
time, so products_only.<mode>.<base>.fraction = (tokens / that time) / bound is the
highest fraction this machine allows the step at this batch, whatever is fused. products_only.with_kept_fraction also keeps the self time of
what fusing cannot remove (the 4-bit dequantization, the attention kernels), as profiled.

    .venv/bin/python bench/roofline.py [--quick] [--rounds N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from core.qdylora import qdylora_layers  # noqa: E402
from core.qdylora.inject import adapter_param_count  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402


def matmul_gflops(n: int, reps: int, device: str) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        with common.Timer() as t:
            a @ b
        times.append(t.s)
    return 2 * n**3 / common.med(times) / 1e9


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


# Work a fused step still has to do besides its products: the 4-bit base's dequantization and
# the attention kernels (already fused by torch). Their self time is read from the profiled step.
KEPT_OPS = ("dequantize", "scaled_dot_product")


def profile_step(trainer, rank: int) -> tuple[dict[tuple, int], float]:
    """One profiled training step: each matrix product's calls by operator and input shapes,
    and the seconds of self time in the operators of KEPT_OPS."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.train_step(rank)
    counts: dict[tuple, int] = {}
    kept_us = 0.0
    for event in prof.events():
        if event.name in PRODUCT_OPS:
            key = (event.name, tuple(tuple(shape) for shape in event.input_shapes))
            counts[key] = counts.get(key, 0) + 1
        elif any(part in event.name for part in KEPT_OPS):
            kept_us += event.self_cpu_time_total
    return counts, kept_us / 1e6


def product_flops(op: str, shapes: tuple) -> int:
    if op == "aten::bmm":
        (batch, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2 * batch * m * k * n
    a, b = (shapes[0], shapes[1]) if op == "aten::mm" else (shapes[1], shapes[2])
    return 2 * a[0] * a[1] * b[1]


def product_call(op: str, shapes: tuple, device: str):
    """A closure that runs this product once on random float32 operands."""
    t = [torch.randn(*shape, device=device) if shape else None for shape in shapes]
    if op == "aten::mm":
        return lambda: torch.mm(t[0], t[1])
    if op == "aten::bmm":
        return lambda: torch.bmm(t[0], t[1])
    if op == "aten::addmm":
        return lambda: torch.addmm(t[0], t[1], t[2])
    return lambda: t[0].addmm_(t[1], t[2])


def replay_products(keys: list[tuple], rounds: int, device: str, interleaved: bool = True) -> dict[tuple, float]:
    """Median seconds of one call of each product alone.

    interleaved: the products take turns within each round, as in a step, where each finds
    its operands out of cache, and a change of machine speed reaches all of them alike;
    otherwise each runs `rounds` times back to back, with warm caches (the kinder ceiling)."""
    calls = {key: product_call(*key, device) for key in keys}
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for call in calls.values():
        call()
    order = [key for _ in range(rounds) for key in keys] if interleaved else [key for key in keys for _ in range(rounds)]
    for key in order:
        with common.Timer() as t:
            calls[key]()
        times[key].append(t.s)
    return {key: common.med(values) for key, values in times.items()}


def products_only(counts: dict[tuple, int], per_call: dict[tuple, float]) -> dict:
    """The step's products as if run alone: total time, FLOPs and speed, the costliest first."""
    rows = []
    for (op, shapes), count in counts.items():
        seconds = per_call[(op, shapes)]
        flops = product_flops(op, shapes)
        rows.append({"op": op, "shapes": [list(s) for s in shapes], "calls": count, "s_per_call": seconds,
                     "s_total": seconds * count, "gflops_per_s": flops / seconds / 1e9, "flops_total": flops * count})
    rows.sort(key=lambda r: -r["s_total"])
    total_s = sum(r["s_total"] for r in rows)
    total_flops = sum(r["flops_total"] for r in rows)
    return {"seconds": total_s, "flops": total_flops, "gflops_per_s": total_flops / total_s / 1e9, "products": rows}


def flop_model(model, r_max: int, width: int) -> dict:
    layers = qdylora_layers(model)
    n_blocks = sum(layer.in_features * layer.out_features for layer in layers.values())
    head = model.get_output_embeddings().weight
    n_head = head.shape[0] * head.shape[1]
    n_mm = n_blocks + n_head
    p_adapter = adapter_param_count(model, r_max)
    per_token = 4 * n_mm + 6 * p_adapter
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * width
    return {"n_block_linear_weights": n_blocks, "n_head_weights": n_head, "n_mm": n_mm, "p_adapter_rmax": p_adapter,
            "flops_per_token": per_token, "attention_flops_per_token": attention,
            "attention_share_of_bound": attention / per_token}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, max length 64")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batching", default="packed", choices=["packed", "padded"])
    p.add_argument("--no-products", action="store_true", help="skip replaying the step's own products (the products-only ceiling)")
    p.add_argument("--product-reps", type=int, default=9, help="rounds of the products' replay")
    p.add_argument("--tag", default="", help="write results/roofline_<tag>.json (a comparison beside the main result)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.max_length, args.matmul_reps = 1, 64, 3
    info = common.machine_info()
    print(info)
    dev = common.device()
    trainers = {}
    for quant in ("nf4", "none"):
        out = common.TMP / f"roofline_{quant}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), quant=quant, r_max=args.r_max,
                          batch_size=args.batch_size, max_length=args.max_length, steps=10_000, seed=42,
                          batching=args.batching)
        tr = Trainer(cfg)
        tr.setup()
        trainers[quant] = tr
    batch = trainers["nf4"]._micro_batch(0)
    width = int(batch["input_ids"].shape[1])
    processed = int(batch["input_ids"].numel())
    useful = sum(len(e.input_ids) for e in trainers["nf4"]._micro_examples(0))
    flops = flop_model(trainers["nf4"].model, args.r_max, width)
    print(f"N_mm = {flops['n_mm'] / 1e6:.1f} M, adapter params at r_max = {flops['p_adapter_rmax'] / 1e6:.2f} M, "
          f"FLOPs/token = {flops['flops_per_token'] / 1e9:.3f} GFLOP; batch {args.batch_size} x {width} "
          f"({useful} non-pad tokens)")
    for tr in trainers.values():  # warm-up
        tr.train_step(args.r_max)
    rounds = []
    for r in range(args.rounds):
        row = {"gflops": matmul_gflops(args.n, args.matmul_reps, dev)}
        order = ["nf4", "none"] if r % 2 == 0 else ["none", "nf4"]
        for quant in order:
            with common.Timer() as t:
                trainers[quant].train_step(args.r_max)
            row[f"{quant}_step_s"] = t.s
        row["gflops_after"] = matmul_gflops(args.n, args.matmul_reps, dev)
        gf = (row["gflops"] + row["gflops_after"]) / 2
        bound = gf * 1e9 / flops["flops_per_token"]
        row["bound_tokens_per_s"] = bound
        for quant in ("nf4", "none"):
            row[f"{quant}_tokens_per_s"] = processed / row[f"{quant}_step_s"]
            row[f"{quant}_useful_tokens_per_s"] = useful / row[f"{quant}_step_s"]
            row[f"{quant}_fraction"] = row[f"{quant}_tokens_per_s"] / bound
            row[f"{quant}_useful_fraction"] = row[f"{quant}_useful_tokens_per_s"] / bound
        row["loadavg"] = common.loadavg()
        rounds.append(row)
        common.log(f"round {r + 1}: matmul {gf:.1f} GFLOP/s, bound {bound:.0f} tok/s; NF4 {row['nf4_tokens_per_s']:.0f} tok/s "
                   f"({row['nf4_fraction']:.1%}), float32 {row['none_tokens_per_s']:.0f} tok/s ({row['none_fraction']:.1%})")
    summary = {k: common.describe([r[k] for r in rounds]) for k in rounds[0] if k != "loadavg"}
    print(f"matmul {summary['gflops']['median']:.1f} GFLOP/s (median); bound {summary['bound_tokens_per_s']['median']:.0f} tokens/s; "
          f"NF4 {summary['nf4_tokens_per_s']['median']:.0f} tokens/s = {summary['nf4_fraction']['median']:.1%} of bound; "
          f"float32 {summary['none_tokens_per_s']['median']:.0f} tokens/s = {summary['none_fraction']['median']:.1%}")
    products = {}
    if not args.no_products:
        bound = summary["bound_tokens_per_s"]["median"]
        profiled = {quant: profile_step(tr, args.r_max) for quant, tr in trainers.items()}
        keys = sorted({key for counts, _ in profiled.values() for key in counts})
        for mode in ("interleaved", "back_to_back"):
            per_call = replay_products(keys, args.product_reps, dev, interleaved=mode == "interleaved")
            for quant, (counts, kept_s) in profiled.items():
                replay = products_only(counts, per_call)
                replay["tokens_per_s"] = processed / replay["seconds"]
                replay["fraction"] = replay["tokens_per_s"] / bound
                replay["measured_step_share"] = replay["seconds"] / summary[f"{quant}_step_s"]["median"]
                replay["kept_s"] = kept_s
                replay["with_kept_fraction"] = processed / (replay["seconds"] + kept_s) / bound
                products.setdefault(mode, {})[quant] = replay
                print(f"{quant}, {mode}: its products alone take {replay['seconds']:.2f} s ({replay['gflops_per_s']:.0f} GFLOP/s), "
                      f"{replay['measured_step_share']:.0%} of the measured step: at most {replay['fraction']:.1%} of the bound; "
                      f"with dequantization and attention ({kept_s:.2f} s) at most {replay['with_kept_fraction']:.1%}")
    for tr in trainers.values():
        tr.cleanup()
        shutil.rmtree(tr.run_dir, ignore_errors=True)
    common.write_result(common.result_name("roofline", args.quick, args.tag), {
        "config": vars(args), "batch_width": width, "processed_tokens": processed, "useful_tokens": useful,
        "execution": {quant: tr.execution() for quant, tr in trainers.items()},
        "flop_model": flops, "rounds": rounds, "summary": summary, "products_only": products}, info)


if __name__ == "__main__":
    main()
