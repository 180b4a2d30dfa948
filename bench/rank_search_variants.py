"""Follow-up to rank_search.py: what closes the NLL gap to per-rank QLoRA — another
rank-sampling rule, or more steps (e.g. the same total compute as the five QLoRA runs)?
And does a longer QLoRA run move too (`qlora@R:STEPS`: one PEFT run at rank R)? Control:
`fixed@R` trains the library's QDyLoRA at b = R on every step, which must match QLoRA r = R.

Trains one QDyLoRA run per variant with core.train.Trainer (same data, batch, max length,
lr and seed as the rank_search.json it reads; a variant `SAMPLING[:STEPS]` sets
`rank_sampling` and optionally the number of steps, default: rank_search's) and
measures the reference NLL (teacher forcing, all eval prompts, bootstrap interval) at
ranks 1,2,4,8,16. The QLoRA numbers and per-prompt sums are read from
results/rank_search.json (same prompts, same order), so the paired gap is computed as
there. No generations (time).

Each invocation adds its variants to results/rank_search_variants.json (same-named ones are
replaced; each records its own date, commit and load), so variants can be run one by one.

    .venv/bin/python bench/rank_search_variants.py [--quick] [--variants uniform:200,pow2,qlora@16:200]
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.qdylora import set_rank  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402

from rank_search import paired_gap, reference_nll  # noqa: E402


def parse_variant(text: str, default_steps: int) -> tuple[str, int | None, int]:
    """'uniform:200' → ('uniform', None, 200); 'qlora@16:200' → ('qlora', 16, 200); 'pow2' → ('pow2', None, default).

    'fixed@R' is QDyLoRA with every step at b = R (rank_sampling list [R]): the control that
    the library's training at one fixed rank matches a PEFT LoRA run of that rank."""
    head, _, steps_text = text.partition(":")
    kind, _, rank_text = head.partition("@")
    steps = int(steps_text) if steps_text else default_steps
    if kind in ("qlora", "fixed"):
        if not rank_text:
            raise SystemExit(f"variant {text!r}: write {kind}@RANK[:STEPS]")
        return kind, int(rank_text), steps
    if kind not in ("uniform", "pow2", "low", "high"):
        raise SystemExit(f"variant {text!r}: unknown rank sampling {kind!r}")
    return kind, None, steps


def nll_row(model, tokenizer, items, rank: int, qlora40: dict, n_boot: int) -> dict:
    row = {"rank": rank} | reference_nll(model, tokenizer, items, n_boot)
    row |= {"qlora_ref_nll": qlora40["ref_nll"], "gap_point": row["ref_nll"] / qlora40["ref_nll"] - 1}
    common.log(f"  rank {rank}: NLL {row['ref_nll']:.4f} [{row['ref_nll_lo']:.4f}, {row['ref_nll_hi']:.4f}] vs QLoRA (rank_search) "
               f"{qlora40['ref_nll']:.4f}: {row['gap_point']:+.2%}")
    return row


def run_qdylora(sampling: str, steps: int, ranks: list[int], cfg0: dict, nll_items, qlora40: dict, per_prompt,
                fixed_rank: int | None = None) -> dict:
    out = common.TMP / f"rank_search_variant_{sampling}{fixed_rank or ''}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    rank_choice = {"rank_sampling": "list", "rank_list": [fixed_rank]} if fixed_rank else {"rank_sampling": sampling}
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), quant="nf4", r_max=max(ranks), steps=steps,
                      batch_size=cfg0["batch_size"], max_length=cfg0["max_length"], lr=cfg0["lr"], seed=cfg0["seed"],
                      checkpoint_every=max(10, steps), **rank_choice)
    if fixed_rank:
        ranks = [fixed_rank]
    common.log(f"QDyLoRA variant {rank_choice}: {steps} steps")

    def on_event(e):
        if e.get("event") == "step" and e["step"] % 20 == 0:
            common.log(f"  step {e['step']}/{steps}, loss {e['loss']:.3f}, rank {e['rank']}")

    t0 = time.perf_counter()
    trainer = Trainer(cfg, on_event=on_event)
    try:
        trainer.setup()
        result = trainer.train()
    finally:
        trainer.cleanup()
    train_s = time.perf_counter() - t0
    trainer.model.eval()
    rows = []
    for b in ranks:
        set_rank(trainer.model, b)
        row = nll_row(trainer.model, trainer.tokenizer, nll_items, b, qlora40[b], cfg0["n_boot"])
        if per_prompt:
            row["nll_gap"] = paired_gap(row, per_prompt[str(b)], cfg0["n_boot"])
        rows.append(row)
    done = {"kind": "qdylora", "rank_sampling": f"fixed b={fixed_rank}" if fixed_rank else sampling, "steps": steps, "train_s": train_s, "final_loss": result.final_loss,
            "histogram": trainer.histogram, "per_rank": rows}
    del trainer
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return done


def run_qlora(rank: int, steps: int, cfg0: dict, nll_items, qlora40: dict) -> dict:
    out = common.TMP / f"rank_search_variant_qlora{rank}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), quant="nf4", r_max=rank, steps=steps,
                      batch_size=cfg0["batch_size"], max_length=cfg0["max_length"], lr=cfg0["lr"], seed=cfg0["seed"],
                      checkpoint_every=max(10, steps))
    common.log(f"QLoRA variant r={rank}: {steps} steps")
    t0 = time.perf_counter()
    peft = common.PeftLoRATrainer(cfg, rank=rank)

    def on_step(s, loss, dt):
        if s % 20 == 0:
            common.log(f"  step {s}/{steps}, loss {loss:.3f}, {dt:.1f}s/step")

    losses = peft.train(on_step=on_step)
    train_s = time.perf_counter() - t0
    rows = [nll_row(peft.model, peft.tokenizer, nll_items, rank, qlora40[rank], cfg0["n_boot"])]
    del peft
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return {"kind": "qlora", "rank": rank, "steps": steps, "train_s": train_s, "final_loss": losses[-1], "per_rank": rows}


def same_budget_gaps(variants: dict, n_boot: int) -> list[dict]:
    """QDyLoRA vs QLoRA trained for the same number of steps, at each rank both have (paired when both kept sums)."""
    out = []
    for qname, q in variants.items():
        if q.get("kind") != "qlora":
            continue
        for dname, d in variants.items():
            if d.get("kind", "qdylora") != "qdylora" or d["steps"] != q["steps"]:
                continue
            for row in d["per_rank"]:
                if row["rank"] != q["rank"]:
                    continue
                ref = q["per_rank"][0]
                gap = {"gap": row["ref_nll"] / ref["ref_nll"] - 1}
                if "nll_sums" in row:
                    gap = paired_gap(row, ref, n_boot)
                out.append({"qdylora": dname, "qlora": qname, "rank": q["rank"], "steps": q["steps"],
                            "qdylora_nll": row["ref_nll"], "qlora_nll": ref["ref_nll"], "gap": gap})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default="uniform:200,pow2",
                   help="comma-separated SAMPLING[:STEPS] (SAMPLING in uniform, pow2, low, high), fixed@RANK[:STEPS] or qlora@RANK[:STEPS]")
    args = p.parse_args()
    info = common.machine_info()
    print(info)
    ref_name = common.result_name("rank_search", args.quick)
    ref = json.loads((common.RESULTS / f"{ref_name}.json").read_text())
    cfg0 = ref["config"]
    ranks = [r["rank"] for r in ref["per_rank"]]
    qlora40 = {r["rank"]: r["qlora"] for r in ref["per_rank"]}
    # Per-prompt QLoRA NLL sums (for the paired interval) are in rank_search.json from the version of
    # rank_search.py that writes qlora_nll_per_prompt; without them only the point gap is reported.
    per_prompt = ref.get("qlora_nll_per_prompt")
    variants = [(v.strip(), *parse_variant(v.strip(), cfg0["steps"])) for v in args.variants.split(",") if v.strip()]
    from core.data import load_eval_set

    items = load_eval_set(common.EVAL_FILE).items
    nll_items = items[: cfg0["nll_prompts"]] if cfg0["nll_prompts"] else items
    name = common.result_name("rank_search_variants", args.quick)
    previous = common.RESULTS / f"{name}.json"
    results = json.loads(previous.read_text())["variants"] if previous.is_file() else {}
    for label, kind, rank, steps in variants:
        provenance = {"date": common.machine_info()["date"], "git_commit": info.get("git_commit"), "loadavg_start": common.loadavg()}
        if kind == "qlora":
            done = run_qlora(rank, steps, cfg0, nll_items, qlora40)
        elif kind == "fixed":
            done = run_qdylora("list", steps, ranks, cfg0, nll_items, qlora40, per_prompt, fixed_rank=rank)
        else:
            done = run_qdylora(kind, steps, ranks, cfg0, nll_items, qlora40, per_prompt)
        results[label] = done | provenance | {"loadavg_end": common.loadavg()}
    same_budget = same_budget_gaps(results, cfg0["n_boot"])
    common.write_result(name, {
        "config": {"variants_this_invocation": args.variants, "quick": args.quick, "from": ref_name, "steps": cfg0["steps"],
                   "batch_size": cfg0["batch_size"], "max_length": cfg0["max_length"], "lr": cfg0["lr"], "seed": cfg0["seed"]},
        "uniform_from_rank_search": [{"rank": r["rank"], "ref_nll": r["qdylora"]["ref_nll"], "gap": r["nll_gap"]["gap"]} for r in ref["per_rank"]],
        "variants": results, "same_budget": same_budget}, info)
    for g in same_budget:
        print(f"same budget ({g['steps']} steps), rank {g['rank']}: QDyLoRA {g['qdylora']} {g['qdylora_nll']:.4f} vs "
              f"QLoRA {g['qlora_nll']:.4f}: gap {g['gap']['gap']:+.2%}")
    try:
        import plot

        plot.main([name])
    except Exception as exc:  # a chart must never lose the numbers
        print(f"plot failed: {exc}")


if __name__ == "__main__":
    main()
