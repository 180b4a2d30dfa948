"""Data-parallel training across processes, launched by Hugging Face Accelerate.

`qdylora train --processes N` checks the request, then runs
`accelerate launch --multi_gpu --num_processes N -m core train …` (torchrun underneath).
Each process loads the base and the adapter, takes its share of every micro-batch, and the
adapter gradients are summed across processes before the optimizer step, so every process
holds the same adapter after every step. The process group is gloo on CPU and NCCL on CUDA
(Accelerate's `PartialState` picks it); nothing else in the code depends on which.

What keeps N processes equal to one process with the same config:
- `batch_size` is the global micro-batch; process p takes the p-th contiguous slice of it
  (so the run's config does not depend on how many processes trained it);
- every process draws the same ranks (the seeded `RankSampler`; checked each step), and
  with several ranks per step an example's group is decided by its global index;
- each process weights its token-mean loss by its share of the micro-batch's label tokens,
  so the summed gradient is the gradient of the global token mean.

Only the main process (rank 0) writes the run folder. Cancel: our launcher runs Accelerate
in its own session and turns SIGTERM/SIGINT into a stop file that every process checks at
each step boundary; the processes agree on stopping through one all-reduce, the main process
saves a checkpoint, and `--resume` continues (with any number of processes).

Torch-free at import: the dashboard calls `find_devices` without paying torch's import.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import RunError, UserError

# Set by our launcher for the processes it starts: a private folder for the stop request
# and for failure notes of processes that cannot write the run folder.
LAUNCH_DIR_ENV = "RANK_STUDIO_LAUNCH_DIR"
STOP_FILE = "stop"


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Devices:
    """What parallel work can be spread over: CUDA GPUs when there are any, else CPU cores."""

    kind: str                # "cuda" or "cpu"
    count: int
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "cuda":
            kinds = {name: self.names.count(name) for name in dict.fromkeys(self.names)} or {"GPU": self.count}
            if self.count == 1:
                return f"1 GPU ({next(iter(kinds))})"
            if len(kinds) == 1:
                return f"{self.count} × {next(iter(kinds))}"
            return f"{self.count} GPUs (" + ", ".join(f"{n} × {name}" if n > 1 else name for name, n in kinds.items()) + ")"
        return f"{self.count} CPU core{'s' if self.count != 1 else ''}, no GPU"

    @property
    def unit(self) -> str:
        return "GPU" if self.kind == "cuda" else "CPU core"


def cpu_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _visible_gpu_filter(names: list[str]) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return names
    picked = []
    for item in (x.strip() for x in visible.split(",")):
        if not item.isdigit() or int(item) >= len(names):
            break  # CUDA stops at the first invalid entry
        picked.append(names[int(item)])
    return picked


@functools.lru_cache(maxsize=1)
def _nvidia_smi_gpus() -> tuple[str, ...]:
    """Names of the machine's GPUs from `nvidia-smi -L` (asked once per process: the pages rerun often)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.split(":", 1)[1].split("(UUID")[0].strip() for line in out.splitlines() if line.startswith("GPU "))


def find_devices() -> Devices:
    """GPUs from `nvidia-smi -L` (no torch import), honouring CUDA_VISIBLE_DEVICES; else CPU cores."""
    names = _visible_gpu_filter(list(_nvidia_smi_gpus()))
    if names:
        return Devices("cuda", len(names), tuple(names))
    return Devices("cpu", cpu_cores())


def training_devices(device: str) -> Devices:
    """The devices a training or sweep process of this machine would use for `device` (auto, cpu, cuda)."""
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            return Devices("cuda", torch.cuda.device_count(),
                           tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
        if device == "cuda":
            raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
    return Devices("cpu", cpu_cores())


def check_parallel(count: int, what: str, devices: Devices) -> None:
    """More processes than devices (or cores) is refused: they would only take turns."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--{what} must be a positive integer, got {count!r}")
    if count > devices.count:
        raise UserError(f"--{what} {count} is more than this machine has: {devices.describe()} "
                        f"(one process per {devices.unit})")


def threads_per_process(count: int) -> int:
    return max(1, cpu_cores() // count)


# ---------------------------------------------------------------- inside a training process


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run; the default is the one-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list) -> list:
        """This process's contiguous share of a global micro-batch (its length divides by world)."""
        if not self.active:
            return items
        share = len(items) // self.world
        return items[self.rank * share:(self.rank + 1) * share]

    def sum_gradients(self, params) -> None:
        """Sum the gradients of `params` over all processes, in one flat all-reduce."""
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def sum_float(self, value: float, device) -> float:
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def any(self, flag: bool, device) -> bool:
        """True on every process when it is true on any one (so all stop at the same step)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def check_same_ranks(self, ranks: list[int], device) -> None:
        """Every process must train the same ranks this step; a mismatch would silently mix ranks."""
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(ranks) + [-r for r in ranks], dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        highest, lowest = tensor[:len(ranks)].tolist(), [-r for r in tensor[len(ranks):].tolist()]
        if highest != lowest:
            raise RuntimeError(f"processes drew different ranks this step ({lowest} vs {highest}): "
                               "their rank samplers are out of step")

    def dropout_seed(self, seed: int, step: int) -> int:
        """A seed per (process, step): processes drop different units, and a resumed run the same ones."""
        return (seed * 1_000_003 + step) * 1_009 + self.rank


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_from_env() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def context(device: str) -> DistContext:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA), or the one-process context."""
    if world_size_from_env() <= 1:
        return DistContext()
    for env, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "").lower() == "true":
            raise UserError(f"this Accelerate config asks for {engine}, which "
                            "Rank Studio's trainer does not implement: launch with --multi_gpu (data parallel, the "
                            "adapter replicated, each process a full copy of the 4-bit base); see docs/SCALING.md")
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return DistContext(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
                       backend=str(state.backend))


# ---------------------------------------------------------------- the launcher's side


def stop_requested() -> bool:
    """Whether our launcher asked the processes to stop (checked at each step boundary)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    return bool(folder) and (Path(folder) / STOP_FILE).exists()


def note_failure(message: str) -> None:
    """A process that cannot write the run folder leaves its failure for the launcher."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder and Path(folder).is_dir():
        with contextlib.suppress(OSError):
            (Path(folder) / f"failure-{rank_from_env()}.txt").write_text(message)


def launched_by_us() -> bool:
    return bool(os.environ.get(LAUNCH_DIR_ENV)) and world_size_from_env() > 1


def accelerate_command(processes: int, threads: int, child_args: list[str]) -> list[str]:
    """`accelerate launch` for N local processes running `python -m core <child_args>`.

    --multi_gpu is Accelerate's name for its torchrun launcher; on a CPU-only machine the
    processes then join a gloo group. Port 0 picks a free port, so runs can share a machine.
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(threads), "--main_process_port", "0",
            "-m", "core", *child_args]


def check_batch(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(f"batch size {batch_size} does not divide by --processes {processes}: each process takes an "
                        f"equal share of every micro-batch (try batch size {max(processes, batch_size // processes * processes)})")


def validate_launch(cfg, resume: bool, processes: int):
    """Every check a training process would make before writing anything, made once before launching.

    Returns the config the processes will train (the saved one when resuming)."""
    from core.train import Trainer
    from core.train_config import TrainConfig, load_run_config

    if resume:
        saved = load_run_config(Path(cfg.out))["train"]
        cfg = TrainConfig.from_dict(saved | {"out": cfg.out})
    check_parallel(processes, "processes", training_devices(cfg.device))
    check_batch(cfg.batch_size, processes)
    Trainer(cfg, resume=resume).check_inputs()
    return cfg


def launch_training(cfg, resume: bool, processes: int, no_progress: bool) -> int:
    """Run `qdylora train` on `processes` processes through Accelerate; returns the CLI exit code."""
    from core import runstate

    if world_size_from_env() > 1:
        raise UserError("--processes starts the processes itself; under accelerate launch leave it out")
    cfg = validate_launch(cfg, resume, processes)
    run_dir = Path(cfg.out)
    if resume:
        from core.train import settle_checkpoints

        settle_checkpoints(run_dir)  # once, before several processes read the checkpoint
    child_args = ["train", "--out", str(run_dir)] + (["--resume"] if resume else cfg.cli_args())
    if no_progress:
        child_args.append("--no-progress")
    threads = threads_per_process(processes)
    with tempfile.TemporaryDirectory(prefix="rank-studio-launch-") as launch_dir:
        env = dict(os.environ, **{LAUNCH_DIR_ENV: launch_dir, "OMP_NUM_THREADS": str(threads)})
        print(f"launching {processes} training processes through Accelerate "
              f"({threads} thread{'s' if threads != 1 else ''} each)", file=sys.stderr, flush=True)
        code = _run_until_done(accelerate_command(processes, threads, child_args), env, Path(launch_dir))
        noted = {int(p.stem.split("-")[1]): p.read_text().strip() for p in Path(launch_dir).glob("failure-*.txt")}
    notes = failure_notes(noted, processes)
    status = runstate.read_status(run_dir) or {}
    said = status.get("status")
    if said == "completed" and code == 0:
        print(f"completed: {status.get('step')}/{status.get('total_steps')} steps, run folder {run_dir}", file=sys.stderr)
        return 0
    if said == "cancelled":
        print(f"cancelled: {status.get('step')}/{status.get('total_steps')} steps, run folder {run_dir}; "
              "--resume continues", file=sys.stderr)
        return 130
    message = "; ".join(notes) or status.get("error") or f"the training processes stopped (exit code {code})"
    where = {"step": status.get("step"), "total_steps": status.get("total_steps")}
    if said in ("running", "died"):
        # The main process could not record the end (another process failed first): record it here.
        runstate.record_failure(run_dir, RunError(message), **where)
    elif said == "failed" and notes:
        # The main process saw only a lost connection; the notes say which process failed and why.
        runstate.write_status(run_dir, "failed", error=message, **where)
    print(f"error: {message}", file=sys.stderr)
    return 1


def failure_notes(noted: dict[int, str], processes: int) -> list[str]:
    """What the processes said when they failed, and which ones said nothing: a process killed
    (e.g. out of memory) leaves no note, and the others then only report a lost connection."""
    notes = [f"process {rank}: {text}" for rank, text in sorted(noted.items())]
    silent = [str(rank) for rank in range(processes) if rank not in noted]
    if notes and silent:
        notes.insert(0, f"process {', '.join(silent)} stopped without an error message (killed, or out of memory?)")
    return notes


def _run_until_done(cmd: list[str], env: dict, launch_dir: Path) -> int:
    """Run the launcher in its own session; SIGTERM/SIGINT here become a stop request for its processes.

    Its own session keeps a signal meant for us (Ctrl-C, the dashboard's cancel of our process
    group) away from torchrun, which would give the processes 30 s before killing them. A second
    Ctrl-C stops them at once.
    """
    from core.jobs import _child_preexec

    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_child_preexec(os.getpid()))
    asked = {"n": 0}

    def on_signal(signum, frame):
        asked["n"] += 1
        if asked["n"] == 1:
            (launch_dir / STOP_FILE).touch()
            print("\nstopping at the next step boundary and saving a checkpoint…", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

