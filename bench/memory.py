"""Base footprint and peak training memory, NF4 vs float32, default model and a ~1B Llama.

Every configuration runs in a fresh subprocess (this script with --child), so one
configuration's allocations cannot hide in another's peak. A child:

1. samples its own RSS every 10 ms in a thread (psutil), tagging the phase;
2. sets up core.train.Trainer (load_base_model + inject_qdylora) and records
   model_footprint_bytes(model) minus the adapter tensors = the base footprint;
3. runs a few real optimizer steps with Trainer.train() (sampled ranks, checkpoints);
4. reports the peak RSS of the load phase, of the training phase, ru_maxrss of the
   whole process, and on CUDA torch.cuda.max_memory_allocated.

Models: the default (SmolLM2-135M, batch 4 x 256 tokens, the demo's config) and a
random-weight Llama built from a config (hidden 2048, 16 layers, intermediate 5632,
32 heads, vocabulary 49152 = the default tokenizer's, untied head: ~1.0 B parameters),
saved once as bf16 safetensors under bench/results/tmp/ (git-ignored), batch 1 x 128.

    .venv/bin/python bench/memory.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

LLAMA_1B = dict(hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=32)
LLAMA_QUICK = dict(hidden=256, layers=2, intermediate=688, heads=4, kv_heads=4)
TARGET_FOOTPRINT = 0.35
TARGET_PEAK_1B = 0.45


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.peak_times: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = rss
                self.peak_times[self.phase] = time.perf_counter()
            time.sleep(self.interval)

    def set_phase(self, phase: str) -> None:
        rss = self.proc.memory_info().rss
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), rss)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child(spec: dict) -> dict:
    from core.models import model_footprint_bytes
    from core.train import TrainConfig, Trainer

    sampler = RssSampler()
    sampler.start()
    rss_imports = sampler.proc.memory_info().rss
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=spec["model"], quant=spec["quant"],
                      r_max=spec["r_max"], batch_size=spec["batch_size"], max_length=spec["max_length"],
                      steps=spec["steps"], checkpoint_every=spec["steps"], seed=42,
                      gradient_checkpointing=spec.get("gradient_checkpointing", False))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler.set_phase("load")
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.setup()
    load_s = time.perf_counter() - t0
    rss_loaded = sampler.proc.memory_info().rss
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainer.params)
    total_bytes = model_footprint_bytes(trainer.model)
    n_params_base = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    by_dtype: dict[str, int] = {}
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            key = str(p.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    cuda_load_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler.set_phase("train")
    trace = install_rss_trace(trainer, sampler.proc) if spec.get("trace") else None
    t0 = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    train_s = time.perf_counter() - t0
    sampler.set_phase("done")
    sampler.stop()
    shutil.rmtree(out, ignore_errors=True)
    return {
        "model": spec["label"], "quant": spec["quant"], "batch_size": spec["batch_size"], "max_length": spec["max_length"],
        "steps": result.steps_done, "r_max": spec["r_max"],
        "base_params_stored": n_params_base,  # NF4 weights count as packed uint8 elements (2 params each)
        "base_footprint_bytes": total_bytes - adapter_bytes, "adapter_bytes": adapter_bytes,
        "base_param_bytes_by_dtype": by_dtype,  # uint8 = packed NF4 weights; float32 = embeddings, head, norms
        "rss_after_imports_bytes": rss_imports, "rss_after_load_bytes": rss_loaded,
        "peak_rss_load_bytes": sampler.peaks.get("load"), "peak_rss_train_bytes": sampler.peaks.get("train"),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_load_bytes": cuda_load_peak,
        "cuda_peak_train_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "load_s": load_s, "train_s": train_s, "loadavg": common.loadavg(),
        "execution": trainer.execution(),   # fused loss, packing, 16-bit embeddings/head (issue 12)
        "rss_trace": trace, "peak_time_train": sampler.peak_times.get("train"),
    }


def install_rss_trace(trainer, proc) -> list:
    """RSS (MiB) at each decoder layer's forward and backward and after each optimizer step:
    where in a step the training peak is reached, and which part of the step holds it."""
    from core import train as train_module
    from core.lm_loss import decoder_of

    events: list = []
    step = [0]

    def mark(label: str) -> None:
        events.append([step[0], label, round(proc.memory_info().rss / 2**20, 1), time.perf_counter()])

    layers = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.ModuleList))
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: mark(f"forward {i}"))
        layer.register_full_backward_hook(lambda *_, i=i: mark(f"backward {i}"))

    def after_step(*_):
        mark("optimizer step")
        step[0] += 1

    trainer.optimizer.register_step_post_hook(after_step)
    decoder_of(trainer.model).register_forward_hook(lambda *_: mark("decoder output"))
    trainer.optimizer.register_step_pre_hook(lambda *_: mark("before step"))
    save = train_module._save_checkpoint

    def traced_save(*a, **k):
        mark("checkpoint start")
        save(*a, **k)
        mark("checkpoint end")

    train_module._save_checkpoint = traced_save
    return events


def run_child(spec: dict, env_extra: dict | None = None) -> dict:
    import os

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    common.log(f"child: {spec['label']} {spec['quant']} {env_extra or ''}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | (env_extra or {}))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def make_model_child(folder: str, shape: dict) -> None:
    common.make_random_llama_folder(Path(folder), **shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny Llama instead of 1B, 1 step")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--make-model", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--only-1b", action="store_true", help="skip the default model")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the children, e.g. MALLOC_MMAP_THRESHOLD_=65536 (experiments)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--tag", default="", help="write results/memory_<tag>.json instead of memory.json")
    p.add_argument("--trace", action="store_true", help="record RSS at every decoder layer's forward/backward (NF4 only)")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.make_model:
        make_model_child(args.make_model[0], json.loads(args.make_model[1]))
        return
    info = common.machine_info()
    print(info)
    steps = 1 if args.quick else args.steps
    shape = LLAMA_QUICK if args.quick else LLAMA_1B
    big_folder = common.TMP / ("llama_tiny_random" if args.quick else "llama_1b_random")
    specs = [] if args.only_1b else [dict(label="default", model="default", batch_size=4, max_length=256)]
    env_extra = dict(kv.split("=", 1) for kv in args.child_env)
    if not args.skip_1b:
        if not (big_folder / "config.json").is_file():
            common.log(f"building random Llama {shape} in {big_folder}")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-model", str(big_folder), json.dumps(shape)], check=True)
        specs.append(dict(label="llama_1b" if not args.quick else "llama_tiny", model=str(big_folder), batch_size=1, max_length=128))
    results = []
    for spec in specs:
        for quant in ("nf4",) if args.trace else ("nf4", "none"):
            full = spec | {"quant": quant, "steps": steps, "r_max": 16, "out": str(common.TMP / f"memory_{spec['label']}_{quant}"),
                           "gradient_checkpointing": args.gradient_checkpointing, "trace": args.trace}
            res = run_child(full, env_extra)
            results.append(res)
            mb = 2**20
            print(f"{res['model']:>10} {quant:>4}: footprint {res['base_footprint_bytes'] / mb:8.1f} MB, peak RSS load "
                  f"{res['peak_rss_load_bytes'] / mb:8.1f} MB, train {res['peak_rss_train_bytes'] / mb:8.1f} MB, "
                  f"ru_maxrss {res['ru_maxrss_bytes'] / mb:8.1f} MB, after imports {res['rss_after_imports_bytes'] / mb:.0f} MB; load {res['loadavg']}")
    if args.trace:
        for res in results:
            trace = res["rss_trace"]
            top = max(trace, key=lambda e: e[2])
            print(f"{res['model']} {res['quant']}: after-load RSS {res['rss_after_load_bytes'] / 2**20:.0f} MiB, "
                  f"traced peak {top[2]:.0f} MiB at step {top[0]} {top[1]}, sampled training peak {res['peak_rss_train_bytes'] / 2**20:.0f} MiB")
            peak_at = res["peak_time_train"]
            for e, nxt in zip(trace, trace[1:] + [None]):
                here = " <- sampled peak after this" if peak_at and e[3] <= peak_at and (nxt is None or peak_at < nxt[3]) else ""
                print("  step {} {:<16} {:8.1f}".format(*e[:3]) + here)
        common.write_result(common.result_name("memory_trace", args.quick, args.tag), {"config": {"steps": steps}, "results": results}, info)
        return
    by = {(r["model"], r["quant"]): r for r in results}
    ratios, targets = {}, {}
    for label in dict.fromkeys(r["model"] for r in results):
        nf4, f32 = by[(label, "nf4")], by[(label, "none")]
        ratios[label] = {
            "footprint": nf4["base_footprint_bytes"] / f32["base_footprint_bytes"],
            "peak_rss_train": nf4["peak_rss_train_bytes"] / f32["peak_rss_train_bytes"],
            "ru_maxrss": nf4["ru_maxrss_bytes"] / f32["ru_maxrss_bytes"],
            "peak_rss_train_minus_imports": (nf4["peak_rss_train_bytes"] - nf4["rss_after_imports_bytes"])
            / (f32["peak_rss_train_bytes"] - f32["rss_after_imports_bytes"]),
        }
        if nf4["cuda_peak_train_bytes"]:
            ratios[label]["cuda_peak_train"] = nf4["cuda_peak_train_bytes"] / f32["cuda_peak_train_bytes"]
        print(f"{label}: NF4/float32 footprint {ratios[label]['footprint']:.3f}, training peak RSS {ratios[label]['peak_rss_train']:.3f}, "
              f"process peak {ratios[label]['ru_maxrss']:.3f}")
    if "default" in ratios:
        targets[f"default_footprint_ratio_le_{TARGET_FOOTPRINT}"] = {"value": ratios["default"]["footprint"], "met": ratios["default"]["footprint"] <= TARGET_FOOTPRINT}
    if "llama_1b" in ratios:
        key = "cuda_peak_train" if "cuda_peak_train" in ratios["llama_1b"] else "peak_rss_train"
        targets[f"llama_1b_training_peak_ratio_le_{TARGET_PEAK_1B}"] = {"value": ratios["llama_1b"][key], "measure": key,
                                                                        "met": ratios["llama_1b"][key] <= TARGET_PEAK_1B}
        targets["llama_1b_process_peak_ratio_incl_load"] = {"value": ratios["llama_1b"]["ru_maxrss"],
                                                            "met": ratios["llama_1b"]["ru_maxrss"] <= TARGET_PEAK_1B}
    name = common.result_name("memory", args.quick, args.tag)
    common.write_result(name, {
        "config": {"steps": steps, "big_model_shape": shape, "big_model_folder": str(big_folder), "child_env": env_extra,
                   "gradient_checkpointing": args.gradient_checkpointing},
        "results": results, "ratios": ratios, "targets": targets}, info)


if __name__ == "__main__":
    main()
