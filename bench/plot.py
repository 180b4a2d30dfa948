"""Charts from bench/results/*.json into bench/results/*.png.

    .venv/bin/python bench/plot.py                 # every result that exists
    .venv/bin/python bench/plot.py rank_search memory
    .venv/bin/python bench/plot.py --quick         # the *_quick.json smoke results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20
C_QDY, C_QLORA, C_BASE, C_F32 = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _footer(fig, data: dict) -> None:
    m = data["machine"]
    commit = (m.get("git_commit") or "?")[:10]
    fig.text(0.01, 0.005, f"{m['device']}, {m['cpu_count']} cores, torch {m['torch']}, commit {commit}, {m['date'][:16]}, "
             f"load avg start {m['loadavg']} end {data.get('loadavg_end')}", fontsize=7, color="#555")


def _save(fig, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _err(values, lo, hi):
    return [[v - a for v, a in zip(values, lo)], [b - v for v, b in zip(values, hi)]]


def rank_search(name: str) -> None:
    data = _load(name)
    if not data:
        return
    rows = data["per_rank"]
    ranks = [r["rank"] for r in rows]
    x = list(range(len(ranks)))
    base = data["base"]
    cfg = data["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, key, label in ((axes[0], "ref_nll", "reference NLL per token (lower is better)"),
                           (axes[1], "rouge_l", "ROUGE-L F (higher is better)")):
        for who, color, dx in (("qdylora", C_QDY, -0.08), ("qlora", C_QLORA, 0.08)):
            vals = [r[who][key] for r in rows]
            err = _err(vals, [r[who][f"{key}_lo"] for r in rows], [r[who][f"{key}_hi"] for r in rows])
            title = "QDyLoRA (one run, r_max %d)" % max(ranks) if who == "qdylora" else "QLoRA (one PEFT run per rank)"
            ax.errorbar([i + dx for i in x], vals, yerr=err, fmt="o-", color=color, capsize=4, label=title)
        ax.axhline(base[key], color=C_BASE, ls="--", label="base model (rank 0)")
        ax.axhspan(base[f"{key}_lo"], base[f"{key}_hi"], color=C_BASE, alpha=0.15)
        ax.set_xticks(x, [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    gaps = [r["nll_gap"] for r in rows]
    axes[2].errorbar(x, [100 * g["gap"] for g in gaps], yerr=_err([100 * g["gap"] for g in gaps], [100 * g["lo"] for g in gaps],
                                                                  [100 * g["hi"] for g in gaps]), fmt="o", color=C_QDY, capsize=4)
    axes[2].axhline(2, color="k", ls=":", label="target: gap <= +2 %")
    axes[2].axhline(0, color=C_BASE, lw=0.8)
    axes[2].set_xticks(x, [str(r) for r in ranks])
    axes[2].set_xlabel("rank")
    axes[2].set_title("NLL gap (QDyLoRA - QLoRA) / QLoRA, %, paired 95 % CI", fontsize=10)
    axes[2].legend(fontsize=8)
    axes[2].grid(alpha=0.3)
    cost = data["cost"]
    fig.suptitle(f"QDyLoRA vs QLoRA, SmolLM2-135M NF4, {cfg['steps']} steps x batch {cfg['batch_size']} x max len {cfg['max_length']}; "
                 f"NLL on {cfg['nll_prompts_used']} prompts, ROUGE-L on {cfg['gen_prompts_used']} ({cfg['max_new_tokens']} new tokens); "
                 f"training cost QLoRA/QDyLoRA = {cost['train_cost_ratio']:.2f}x", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    _footer(fig, data)
    _save(fig, name)


def rank_search_variants(name: str) -> None:
    """Parity benchmark: per held-out set, NLL by rank of each side at its best lr, gaps, and the lr search."""
    data = _load(name)
    if not data or "final" not in data:
        return
    ranks = data["config"]["ranks"]
    x = list(range(len(ranks)))
    sets = list(data["final"])
    fig, axes = plt.subplots(len(sets), 3, figsize=(17, 5.2 * len(sets)), squeeze=False)
    palette = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#1f77b4", "#aec7e8", "#ffbb78", "#98df8a"]
    styles = {"qlora": ("s-", C_QLORA), "rslora": ("s--", "#a50f15"), "today": ("o:", C_BASE)}
    for row, set_name in zip(axes, sets):
        final = data["final"][set_name]
        colors = iter(palette * 3)
        one_lr = final.get("gaps_one_lr") or {}
        for side, by_rank in sorted(final["rows"].items()):
            marker, color = styles.get(side, ("D-", next(colors)))
            if side in one_lr:   # a default has one lr for every set: show that, not the per-set best
                by_rank = {r: {"nll": v["nll"], "lr": v["lr"]} for r, v in one_lr[side].items()}
            xs = [ranks.index(int(r)) for r in by_rank]
            vals = [v["nll"] for v in by_rank.values()]
            lrs = sorted({v["lr"] for v in by_rank.values()})
            label = f"{side} (lr {', '.join(f'{lr:g}' for lr in lrs)})" if side not in DEDICATED_PLOT else f"{side}, dedicated run per rank, its best lr"
            if side == "today":
                label = f"today's defaults (alpha/b, uniform, lr {lrs[0]:g})"
            row[0].plot(xs, vals, marker, color=color, label=label, lw=2.2 if side in DEDICATED_PLOT else 1.2)
            if side in final["gaps"]:
                gaps = one_lr.get(side) or final["gaps"][side]
                gx = [ranks.index(int(r)) for r in gaps]
                g = [100 * v["nll_gap"]["gap"] for v in gaps.values()]
                lo = [100 * v["nll_gap"]["lo"] for v in gaps.values()]
                hi = [100 * v["nll_gap"]["hi"] for v in gaps.values()]
                row[1].errorbar(gx, g, yerr=_err(g, lo, hi), fmt=marker, color=color, capsize=3, label=side)
        row[0].axhline(final["base_nll"], color=C_BASE, lw=0.8, ls="--", label=f"base model {final['base_nll']:.2f}")
        row[0].set_title(f"{set_name}: reference NLL per token on {final['prompts']} prompts (lower is better)", fontsize=10)
        row[1].set_title(f"{set_name}: gap to the best dedicated run at each rank, % (paired 95 % CI)", fontsize=10)
        row[1].axhline(100 * data["config"]["target_gap"], color="k", ls=":", label="target +2 %")
        row[1].axhline(0, color=C_BASE, lw=0.8)
        search = data["search"][set_name]
        colors = iter(palette * 3)
        for side, by_lr in sorted(search.items()):
            marker, color = styles.get(side, ("D-", next(colors)))
            lrs = sorted(by_lr, key=float)
            means = [sum(by_lr[lr].values()) / len(by_lr[lr]) if by_lr[lr] else float("nan") for lr in lrs]
            row[2].plot([float(lr) for lr in lrs], [m if m < 1e9 else float("nan") for m in means], marker, color=color, label=side)
        row[2].set_xscale("log")
        row[2].set_title(f"{set_name}: lr search, mean NLL over the ranks run (search subset)", fontsize=10)
        row[2].set_xlabel("learning rate")
        for ax in row[:2]:
            ax.set_xticks(x, [str(r) for r in ranks])
            ax.set_xlabel("rank")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=1)
    fig.suptitle(f"One run for every rank vs a dedicated QLoRA run per rank, each at its best lr "
                 f"({data['config']['steps']} steps, SmolLM2-135M NF4)", fontsize=11)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    _footer(fig, data)
    _save(fig, name)


DEDICATED_PLOT = ("qlora", "rslora")


def step_time(name: str) -> None:
    data = _load(name)
    if not data:
        return
    res = data["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    labels = [("qdylora_fixed", "QDyLoRA b = r_max", C_QDY), ("qdylora_sampled", "QDyLoRA sampled b", "#9ecae1"), ("peft", "PEFT LoRA r = r_max", C_QLORA)]
    width = 0.25
    for j, (key, label, color) in enumerate(labels):
        xs = [i + (j - 1) * width for i in range(len(res))]
        meds = [r["step_s"][key]["median"] for r in res]
        axes[0].bar(xs, meds, width, color=color, label=label)
        for xx, r in zip(xs, res):
            axes[0].plot([xx] * len(r["step_s_raw"][key]), r["step_s_raw"][key], ".", color="k", ms=3)
    axes[0].set_xticks(range(len(res)), [f"{'NF4' if r['quant'] == 'nf4' else 'float32'}, r_max {r['r_max']}" for r in res])
    axes[0].set_ylabel("seconds per optimizer step (median; dots = rounds)")
    axes[0].set_title(f"step time, batch {res[0]['batch_size']} x {res[0]['batch_width']} tokens (one fixed batch)", fontsize=10)
    axes[0].legend(fontsize=8)
    for i, r in enumerate(res):
        axes[1].plot([i - 0.1] * len(r["ratio_fixed_raw"]), r["ratio_fixed_raw"], "o", color=C_QDY, alpha=0.5)
        axes[1].plot([i + 0.1] * len(r["ratio_sampled_raw"]), r["ratio_sampled_raw"], "o", color="#9ecae1", alpha=0.7)
        axes[1].plot([i - 0.2, i], [r["ratio_fixed"]["median"]] * 2, color=C_QDY, lw=3)
        axes[1].plot([i, i + 0.2], [r["ratio_sampled"]["median"]] * 2, color="#6baed6", lw=3)
        axes[1].text(i - 0.1, r["ratio_fixed"]["median"], f" {r['ratio_fixed']['median']:.3f}", fontsize=8, va="bottom", ha="right")
        axes[1].text(i + 0.1, r["ratio_sampled"]["median"], f" {r['ratio_sampled']['median']:.3f}", fontsize=8, va="bottom")
    axes[1].axhline(1.05, color="k", ls=":", label="target 1.05 (b = r_max)")
    axes[1].axhline(1.0, color=C_BASE, lw=0.8)
    axes[1].set_xticks(range(len(res)), [f"{'NF4' if r['quant'] == 'nf4' else 'float32'}, r_max {r['r_max']}" for r in res])
    axes[1].set_ylabel("QDyLoRA step / PEFT step (same round)")
    axes[1].set_title("side-by-side ratio per round (bars = median); dark b = r_max, light sampled b", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def memory(name: str) -> None:
    data = _load(name)
    if not data:
        return
    res = data["results"]
    models = list(dict.fromkeys(r["model"] for r in res))
    by = {(r["model"], r["quant"]): r for r in res}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    metrics = [("base_footprint_bytes", "base footprint\n(model_footprint_bytes)"), ("rss_after_load_bytes", "RSS after load"),
               ("peak_rss_train_bytes", "peak RSS\ntraining phase"), ("ru_maxrss_bytes", "peak RSS whole process\n(incl. load)")]
    for ax, model in zip(axes[0], models):
        for j, quant in enumerate(("nf4", "none")):
            r = by[(model, quant)]
            vals = [r[k] / MB for k, _ in metrics]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(metrics))]
            bars = ax.bar(xs, vals, 0.38, color=C_QDY if quant == "nf4" else C_F32, label="NF4" if quant == "nf4" else "float32")
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ratios = data["ratios"][model]
        ax.set_xticks(range(len(metrics)), [m for _, m in metrics], fontsize=8)
        ax.set_ylabel("MiB")
        r0 = by[(model, "nf4")]
        ax.set_title(f"{model}: batch {r0['batch_size']}, max len {r0['max_length']}; NF4/float32 footprint {ratios['footprint']:.2f}, "
                     f"training peak {ratios['peak_rss_train']:.2f}", fontsize=9)
        ax.axhline(r0["rss_after_imports_bytes"] / MB, color=C_BASE, ls=":", label="RSS after imports")
        ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def sweep_cost(name: str) -> None:
    data = _load(name)
    if not data:
        return
    sw, lat = data["sweep"], data["latency"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    single = sw["sum_single_s"]["median"]
    setup, loop = sw["sweep_setup_s"]["median"], sw["sweep_loop_s"]["median"]
    axes[0].bar([0], [single], color=C_QLORA, label="sum of single-rank evaluations (model loaded)")
    axes[0].bar([1], [loop], color=C_QDY, label="sweep: rank loop")
    axes[0].bar([1], [setup], bottom=[loop], color="#9ecae1", label="sweep: setup (load run)")
    axes[0].axhline(1.1 * single, color="k", ls=":", label="1.1 x sum")
    axes[0].set_xticks([0, 1], ["K single-rank evals", "K-rank sweep"])
    axes[0].set_ylabel("seconds (median of rounds)")
    axes[0].set_title(f"ranks {sw['ranks']}, {sw['prompts']} prompts: ratio end to end {sw['ratio_total']['median']:.2f}, "
                      f"loop {sw['ratio_loop']['median']:.2f}; set_rank {data['switch']['ms']['median']:.2f} ms", fontsize=9)
    axes[0].set_ylim(0, 1.45 * max(single, setup + loop))
    axes[0].legend(fontsize=7, loc="upper left", ncol=2)
    ranks = [int(b) for b in lat["per_rank"]]
    per = lat["per_rank"]
    for j, (key, label, color) in enumerate((("unmerged_ms_per_token", "unmerged (NF4 + adapter)", C_QDY),
                                             ("merged_ms_per_token", "merged (float32)", C_F32),
                                             ("base_ms_per_token", "plain base (float32)", C_BASE))):
        xs = [i + (j - 1) * 0.27 for i in range(len(ranks))]
        vals = [per[str(b)][key] if str(b) in per else per[b][key] for b in ranks]
        axes[1].bar(xs, vals, 0.27, color=color, label=label)
    axes[1].set_xticks(range(len(ranks)), [str(b) for b in ranks])
    axes[1].set_xlabel("rank (0 = adapters off)")
    axes[1].set_ylabel("ms per generated token, batch 1 (median)")
    axes[1].set_title("latency per token, batch 1 (rank 0: merged = base, identical weights: shows the noise)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def roofline(name: str) -> None:
    data = _load(name)
    if not data:
        return
    s = data["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    vals = [s["bound_tokens_per_s"]["median"], s["none_tokens_per_s"]["median"], s["nf4_tokens_per_s"]["median"]]
    bars = ax.bar(["bound (matmul GFLOP/s / FLOPs per token)", "float32 base", "NF4 base"], vals, color=[C_BASE, C_F32, C_QDY])
    for b, v, f in zip(bars, vals, [None, s["none_fraction"]["median"], s["nf4_fraction"]["median"]]):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}" + (f" ({f:.0%})" if f else ""), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training tokens / s (processed, median)")
    ax.set_title(f"matmul {s['gflops']['median']:.0f} GFLOP/s float32; {data['flop_model']['flops_per_token'] / 1e9:.2f} GFLOP per token",
                 fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def demo_run(name: str) -> None:
    data = _load(name)
    if not data:
        return
    rows = data["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ranks = [int(r["rank"]) for r in rows]
    vals = [r["ref_nll"] for r in rows]
    axes[0].errorbar(range(len(ranks)), vals, yerr=_err(vals, [r["ref_nll_lo"] for r in rows], [r["ref_nll_hi"] for r in rows]),
                     fmt="o-", color=C_QDY, capsize=4)
    axes[0].set_xticks(range(len(ranks)), [str(r) for r in ranks])
    axes[0].set_xlabel("rank (0 = base model)")
    axes[0].set_ylabel("reference NLL per token, 95 % CI")
    axes[0].set_title(f"demo sweep on sample_data/eval.jsonl; best rank {data['best_rank']}", fontsize=10)
    axes[0].grid(alpha=0.3)
    tr = data["train"]
    axes[1].plot(range(1, len(tr["loss_curve"]) + 1), tr["loss_curve"], color=C_QDY)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (sampled rank)")
    axes[1].set_title(f"demo training: {tr['wall_s'] / 60:.2f} min end to end (target < 6), mean load {tr['load1_mean'] or 0:.1f}", fontsize=10)
    axes[1].grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def under_load(name: str) -> None:
    """Slowdown beside 1 and 2 busy processes per thread policy, training step and sweep, with the 2x target."""
    data = _load(name)
    if not data:
        return
    policies = list(data["results"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    colors = {"1": "#fdae6b", "2": "#e6550d"}
    for ax, job in zip(axes, ("train", "sweep")):
        for j, k in enumerate(("1", "2")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(policies))]
            rows = [data["results"][p]["summary"][job]["slowdown"][k] for p in policies]
            vals = [r["median"] for r in rows]
            lo = [min(r["ci95"][0], r["median"]) if r["ci95"][0] == r["ci95"][0] else r["median"] for r in rows]
            hi = [max(r["ci95"][1], r["median"]) if r["ci95"][1] == r["ci95"][1] else r["median"] for r in rows]
            ax.bar(xs, vals, 0.38, color=colors[k], yerr=_err(vals, lo, hi), capsize=3,
                   label=f"beside {k} busy process{'es' if k == '2' else ''}")
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(2.0, color="k", ls=":", label="target: 2x (beside 1)")
        ax.axhline(1.0, color=C_BASE, lw=0.8)
        idle = [data["results"][p]["summary"][job]["seconds"]["0"]["median"] for p in policies]
        ax.set_xticks(range(len(policies)), [f"{p}\nidle {t:.1f}s" for p, t in zip(policies, idle)])
        ax.set_title({"train": "training step", "sweep": "small sweep"}[job] + ": time / idle time (median of rounds)", fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("slowdown")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _footer(fig, data)
    _save(fig, name)


def scale(name: str) -> None:
    data = _load(name)
    if not data:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    train_variants = {"threads_2": "1 process × 2 threads", "processes_2": "2 processes × 1 thread"}
    panels = [
        (data["training"], train_variants, "s_per_step", "training: seconds per step (steady)", "speedup_per_step"),
        (data["training"], train_variants, "wall_s", "training: whole command, s", "speedup_wall"),
        (data["sweep"], {"workers_1": "1 worker × 2 threads", "workers_2": "2 workers × 1 thread"}, "span_s",
         "sweep over 4 ranks: folder created to end, s", "speedup_span"),
    ]
    for ax, (part, variants, key, title, ratio) in zip(axes, panels):
        for j, (variant, label) in enumerate(variants.items()):
            values = sorted(r[variant][key] for r in part["rounds"])
            bars = ax.bar([j], [values[len(values) // 2]], 0.6, color=[C_BASE, C_QDY][j], label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
            ax.plot([j] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(variants)), list(variants.values()), fontsize=8)
        ax.set_ylabel("seconds (median of rounds; dots: each round)")
        ax.set_title(f"{title}\nspeed-up {part[ratio]['median']:.2f}× ({len(part['rounds'])} rounds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, data)
    _save(fig, name)


PLOTS = {"scale": scale, "rank_search": rank_search, "step_time": step_time, "memory": memory, "sweep_cost": sweep_cost,
         "roofline": roofline, "demo_run": demo_run, "rank_search_variants": rank_search_variants,
         "under_load": under_load}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")] or list(PLOTS)
    for name in names:
        base = name.removesuffix("_quick").removesuffix("_200")
        target = name if name.endswith("_quick") else (f"{name}_quick" if quick else name)
        if base in PLOTS:
            PLOTS[base](target)


if __name__ == "__main__":
    main()
