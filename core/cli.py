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


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


_FLAG_TYPES = {"str": str, "int": int, "float": float, "str | None": str, "int | None": int,
               "list[str] | None": _str_list, "list[int] | None": _int_list}


def add_train_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--r-max for r_max), its help from the field; unset flags keep
    the config's own default, so the defaults live in one place."""
    from dataclasses import MISSING, fields

    from core.train_config import TrainConfig

    for f in fields(TrainConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = default is not None and default is not False
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if shown else "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            # choices: a wrong name is a usage error that names the flag and what it accepts
            parser.add_argument(flag, type=_FLAG_TYPES[f.type], default=None, choices=f.metadata.get("choices"),
                                help=help_text.replace("%", "%%"))


def train_config_from_args(args: argparse.Namespace, **fixed):
    """The TrainConfig the flags ask for (fields not given take the config's defaults)."""
    from dataclasses import fields

    from core.train_config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig(**(given | fixed))


def add_processes_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel training processes (one per GPU, or sharing the CPU cores), launched "
                             "through Accelerate; --batch-size is the global micro-batch and must divide by it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdylora", description="QDyLoRA: train once, use any rank.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a QDyLoRA adapter (one run serves ranks 1..r_max)")
    add_train_config_flags(t)
    t.add_argument("--out", required=True, help="run folder (new, or existing with --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (events still go to progress.jsonl)")
    add_processes_flag(t)

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
    s.add_argument("--prompts", nargs="+", help="evaluation set(s) (JSONL or CSV); several files are reported as named sets; "
                                               "not needed with --resume")
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
    s.add_argument("--quality-path", default="auto", choices=["auto", "merged", "unmerged"],
                   help="quality metrics on each rank merged into a float copy of the base (faster, same answers), "
                        "on the adapter over the loaded base, or auto (merged when the copy fits in memory)")
    s.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    s.add_argument("--batch-size", type=int, default=32, help="most prompts per batch (prompts of similar length go together)")
    s.add_argument("--recommend-metric", default=None,
                   help="metric the recommendation uses, one of --metrics (default: ref_nll when measured, "
                        "else the first of rouge_l, fact_recall, similarity that is)")
    s.add_argument("--threshold", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true", help="continue a cancelled sweep, keeping finished ranks")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--workers", type=int, default=1,
                   help="processes measuring different ranks at once (one per GPU, or sharing the CPU cores); "
                        "the files written are the same as with one")
    f = sub.add_parser("refine", help="continue training one rank of a finished run on its own, as a new run")
    f.add_argument("--run", required=True, help="finished run to take the rank from")
    f.add_argument("--rank", type=int, required=True, help="rank to polish (1..r_max of --run)")
    f.add_argument("--steps", type=int, required=True, help="optimizer steps of the new run")
    f.add_argument("--out", required=True, help="new run folder")
    f.add_argument("--data", default=None, help="training data (default: the run's)")
    f.add_argument("--lr", type=float, default=None, help="learning rate (default: the run's, at most 1e-3, or 3e-4 if its lr decayed)")
    f.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: the run's)")
    f.add_argument("--seed", type=int, default=None, help="seed (default: the run's)")
    f.add_argument("--no-progress", action="store_true")
    add_processes_flag(f)

    r = sub.add_parser("recommend", help="re-decide a finished sweep's rank with another metric or threshold (no re-run)")
    r.add_argument("--sweep", required=True)
    r.add_argument("--metric", default="ref_nll", choices=["ref_nll", "rouge_l", "fact_recall", "similarity"])
    r.add_argument("--threshold", type=float, default=0.95)

    rp = sub.add_parser("report", help="write a sweep's decision report (Markdown with charts, and one HTML file)")
    rp.add_argument("--sweep", required=True, help="a finished sweep folder")
    rp.add_argument("--out", required=True, help="folder to write (must be missing or empty)")
    rp.add_argument("--metric", default=None, choices=["ref_nll", "rouge_l", "fact_recall", "similarity"],
                    help="the deciding metric (default: the sweep's)")
    rp.add_argument("--threshold", type=float, default=None, help="share of the best rank's score (default: the sweep's)")
    rp.add_argument("--rank", type=int, default=None, help="the rank chosen, when not the recommended one")

    pg = sub.add_parser("playground", help="answer questions at several ranks for the dashboard (loads the run once)")
    pg.add_argument("--run", required=True, help="training run folder")
    pg.add_argument("--dir", required=True, help="playground folder (request.json in, answers.json out)")
    pg.add_argument("--idle-exit", type=float, default=900.0, help="exit after this many seconds without a question")
    return parser


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True, file=sys.stderr)


def cmd_train(args) -> int:
    from core.errors import UserError

    if not args.resume and not args.data:
        raise UserError("--data is required (unless --resume continues an existing run)")
    # With --resume the run's saved config wins; data is only a placeholder here.
    cfg = train_config_from_args(args, data=args.data or "", out=args.out)
    return _run_training(cfg, args.resume, args.no_progress, args.processes)


def _run_training(cfg, resume: bool, no_progress: bool, processes: int = 1) -> int:
    from core import distributed
    from core.train import train

    if processes != 1:
        return distributed.launch_training(cfg, resume, processes, no_progress)
    cancel = CancelFlag().install()
    # Under a launcher, only the main process shows progress; the launcher's stop request counts as a cancel.
    no_progress = no_progress or distributed.rank_from_env() != 0
    bar = None

    def on_event(event: dict) -> None:
        nonlocal bar
        if event["event"] == "start":
            bar = _progress_bar(event["total_steps"], "training", no_progress)
            bar.update(event["step"])
        elif event["event"] == "step" and bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{event['loss']:.3f}", rank=event["rank"], tok_s=f"{event['tokens_per_s']:.0f}")

    try:
        result = train(cfg, resume=resume, on_event=on_event, should_stop=lambda: cancel() or distributed.stop_requested())
    except BaseException as exc:
        from core.runstate import describe_failure

        distributed.note_failure(describe_failure(exc))
        raise
    finally:
        if bar is not None:
            bar.close()
    if distributed.launched_by_us():
        return EXIT_OK  # our launcher reads the outcome from the run folder; torchrun counts any other code as a crash
    print(f"{result.status}: {result.steps_done}/{result.total_steps} steps, run folder {result.run_dir}", file=sys.stderr)
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_OK


def cmd_refine(args) -> int:
    from core.refine import refine_config

    cfg = refine_config(args.run, args.rank, args.steps, args.out, data=args.data, lr=args.lr,
                        batch_size=args.batch_size, seed=args.seed)
    return _run_training(cfg, False, args.no_progress, args.processes)


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
            if event.get("workers_note"):
                print(f"note: {event['workers_note']}", file=sys.stderr, flush=True)
            bar = _progress_bar(event["total_units"], "sweep", args.no_progress)
            bar.update(event.get("done_units", 0))
        elif event["event"] == "prompt" and bar is not None:
            bar.update(event.get("units", 1))
            bar.set_postfix(rank=event["rank"])

    try:
        result = run_sweep(cfg, resume=args.resume, on_event=on_event, should_stop=cancel, workers=args.workers)
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


def cmd_report(args) -> int:
    from core import runstate
    from core.errors import UserError
    from core.evaluation.report import report_for_sweep, write_report

    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    if not runstate.folder_is_empty_or_missing(Path(args.out)):
        raise UserError(f"output folder {args.out} already holds files; choose a new folder")
    report = report_for_sweep(Path(args.sweep), args.metric, args.threshold, args.rank)
    for path in write_report(report, Path(args.out)):
        print(path)
    print(f"decision report: {'rank ' + str(report.rank) if report.rank is not None else 'no rank'}", file=sys.stderr)
    return EXIT_OK


def cmd_playground(args) -> int:
    from core.playground_worker import run_playground

    run_playground(Path(args.run), Path(args.dir), idle_exit_s=args.idle_exit, should_stop=CancelFlag().install())
    return EXIT_OK


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "export": cmd_export, "sweep": cmd_sweep,
            "recommend": cmd_recommend, "refine": cmd_refine, "report": cmd_report, "playground": cmd_playground}


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
    from core import threads

    # Before torch is imported: its OpenMP runtime reads the policy when it starts (core/threads.py).
    threads.configure_job()
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
