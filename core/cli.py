"""`qdylora` command line: train, generate, export, sweep.

Exit codes: 0 done, 2 bad input (message on stderr, nothing overwritten),
130 cancelled (checkpoint saved; `--resume` continues), 1 unexpected failure.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class CancelFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT aborts."""

    def __init__(self):
        self._event = threading.Event()

    def install(self) -> "CancelFlag":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._event.set()
        print("\nstopping at the next step boundary and saving a checkpoint…", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self._event.is_set()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (which argument, what is wrong), exit code 2 like every input error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdylora", description="QDyLoRA: train once, use any rank.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a QDyLoRA adapter (one run serves ranks 1..r_max)")
    t.add_argument("--data", help="training data (JSONL or CSV); not needed with --resume")
    t.add_argument("--prompt-col", default="prompt")
    t.add_argument("--response-col", default="response")
    t.add_argument("--model", default="default", help="'default', a local HF model folder or a hub id")
    t.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--r-max", type=int, default=64)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument("--target-modules", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated leaf names (default: all linear layers of the blocks)")
    t.add_argument("--rank-sampling", default="uniform", choices=["uniform", "pow2", "low", "high", "list"])
    t.add_argument("--rank-list", type=_int_list, default=None, help="ranks for --rank-sampling list, e.g. 1,2,4,8")
    t.add_argument("--update", default="full", choices=["full", "frozen"])
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"])
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--max-grad-norm", type=float, default=0.3)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--checkpoint-every", type=int, default=10)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--out", required=True, help="run folder (new, or existing with --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (events still go to progress.jsonl)")

    g = sub.add_parser("generate", help="answer a prompt with a run at a chosen rank")
    g.add_argument("--run", required=True)
    g.add_argument("--rank", type=int, required=True, help="0 = base model, 1..r_max = adapter rank")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("export", help="export one rank as a PEFT LoRA adapter (+ merged weights)")
    e.add_argument("--run", required=True)
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--merge", action="store_true", help="also write merged 16/32-bit weights to OUT/merged")
    e.add_argument("--merge-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--sweep", default=None, help="sweep folder whose numbers for this rank go into the rank card")

    s = sub.add_parser("sweep", help="measure quality, latency and memory per rank on held-out prompts")
    s.add_argument("--run", help="training run folder to evaluate; not needed with --resume")
    s.add_argument("--prompts", help="evaluation set (JSONL or CSV); not needed with --resume")
    s.add_argument("--prompt-col", default="prompt")
    s.add_argument("--reference-col", default="reference")
    s.add_argument("--id-col", default="id")
    s.add_argument("--must-include-col", default="must_include")
    s.add_argument("--ranks", default=None, help="comma-separated, e.g. 0,1,2,4,8 (default: 0 and powers of two up to r_max)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--metrics", default="ref_nll,rouge_l,fact_recall,similarity",
                   help="comma-separated quality metrics: ref_nll, rouge_l, fact_recall, similarity")
    s.add_argument("--latency", default="on", choices=["on", "off"], help="measure latency (unmerged and merged)")
    s.add_argument("--latency-repeats", type=int, default=3)
    s.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--recommend-metric", default=None,
                   help="metric the recommendation uses, one of --metrics (default: ref_nll when measured, else the first)")
    s.add_argument("--threshold", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true", help="continue a cancelled sweep, keeping finished ranks")
    s.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("recommend", help="re-decide a finished sweep's rank with another metric or threshold (no re-run)")
    r.add_argument("--sweep", required=True)
    r.add_argument("--metric", default="ref_nll", choices=["ref_nll", "rouge_l", "fact_recall", "similarity"])
    r.add_argument("--threshold", type=float, default=0.95)
    return parser


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True, file=sys.stderr)


def cmd_train(args) -> int:
    from core.errors import UserError
    from core.train import TrainConfig, train

    if not args.resume and not args.data:
        raise UserError("--data is required (unless --resume continues an existing run)")
    fields = dict(
        out=args.out, prompt_col=args.prompt_col, response_col=args.response_col,
        model=args.model, quant=args.quant, device=args.device, r_max=args.r_max, alpha=args.alpha,
        dropout=args.dropout, target_modules=args.target_modules, rank_sampling=args.rank_sampling,
        rank_list=args.rank_list, update=args.update, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, max_length=args.max_length, seed=args.seed,
        checkpoint_every=args.checkpoint_every, gradient_checkpointing=args.gradient_checkpointing,
    )
    # With --resume the run's saved config wins; data is only a placeholder here.
    cfg = TrainConfig(data=args.data or "", **fields)
    cancel = CancelFlag().install()
    bar = None

    def on_event(event: dict) -> None:
        nonlocal bar
        if event["event"] == "start":
            bar = _progress_bar(event["total_steps"], "training", args.no_progress)
            bar.update(event["step"])
        elif event["event"] == "step" and bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.3f}", rank=event["rank"], tok_s=f"{event['tokens_per_s']:.0f}")

    try:
        result = train(cfg, resume=args.resume, on_event=on_event, should_stop=cancel)
    finally:
        if bar is not None:
            bar.close()
    print(f"{result.status}: {result.steps_done}/{result.total_steps} steps, run folder {result.run_dir}", file=sys.stderr)
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_OK


def cmd_generate(args) -> int:
    from core.runs import check_rank, generate_at_rank, load_run, run_info
    from core.validation import check_generation

    info = run_info(Path(args.run))
    check_rank(args.rank, info["config"]["qdylora"]["r_max"])  # before the slow model load
    check_generation(args.max_new_tokens, args.temperature, args.top_p)
    loaded = load_run(Path(args.run))
    text = generate_at_rank(loaded, [args.prompt], args.rank, max_new_tokens=args.max_new_tokens,
                            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)[0]
    print(text)
    return EXIT_OK


def cmd_export(args) -> int:
    from core.export import ExportConfig, export_rank

    card = export_rank(
        ExportConfig(run=args.run, rank=args.rank, out=args.out, merge=args.merge, merge_dtype=args.merge_dtype, sweep=args.sweep),
        on_progress=lambda message: print(message, file=sys.stderr),
    )
    print(f"exported rank {card['rank']} ({card['adapter_params']:,} adapter parameters) to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_sweep(args) -> int:
    from core.errors import UserError
    from core.evaluation.sweep import SweepConfig, run_sweep

    if not args.resume and not (args.run and args.prompts):
        raise UserError("--run and --prompts are required (unless --resume continues an existing sweep)")
    # With --resume the sweep's saved config wins; run and prompts are only placeholders here.
    cfg = SweepConfig.from_cli(args)
    cancel = CancelFlag().install()
    bar = None

    def on_event(event: dict) -> None:
        nonlocal bar
        if event["event"] == "start":
            bar = _progress_bar(event["total_units"], "sweep", args.no_progress)
            bar.update(event.get("done_units", 0))
        elif event["event"] == "prompt" and bar is not None:
            bar.update(event.get("units", 1))
            bar.set_postfix(rank=event["rank"])

    try:
        result = run_sweep(cfg, resume=args.resume, on_event=on_event, should_stop=cancel)
    finally:
        if bar is not None:
            bar.close()
    print(result.message, file=sys.stderr)
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_OK


def cmd_recommend(args) -> int:
    from core.evaluation.sweep import recommend_from_sweep

    rec = recommend_from_sweep(Path(args.sweep), args.metric, args.threshold)
    print(rec.rank if rec.rank is not None else "none")
    print(rec.reason, file=sys.stderr)
    return EXIT_OK


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "export": cmd_export, "sweep": cmd_sweep,
            "recommend": cmd_recommend}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from core.errors import UserError

    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_CANCELLED


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
