"""Training memory: large temporaries get their own mappings, so freeing them gives the memory back."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A fresh process, so glibc's adaptive threshold starts where every training process starts.
PROBE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from core.lowmem import map_large_blocks

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    if sys.argv[1] == "mapped":
        assert map_large_blocks()
    warm = torch.ones(4 << 20)          # 16 MiB, freed: glibc's adaptive threshold rises to its size
    del warm
    block = torch.ones(2 << 20)         # 8 MiB, like one dequantized weight
    keep = torch.ones(1024)             # small and long-lived, above it in the heap
    before = rss()
    del block
    print((before - rss()) / 2**20)
""")


def _returned_mib(policy: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, policy, str(ROOT)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_large_block_goes_back_to_the_system_only_when_large_blocks_are_mapped():
    assert _returned_mib("adaptive") < 1          # the hole stays in the heap: what fragmented 1 B NF4 training
    assert _returned_mib("mapped") >= 7.9


def test_training_maps_large_blocks_before_loading(tiny_model_dir, small_train_file, tmp_path, monkeypatch):
    import core.train as train_module
    from core.train import TrainConfig, Trainer

    calls = []
    real_load = train_module.load_base_model
    monkeypatch.setattr(train_module, "map_large_blocks", lambda *a: calls.append("map") or True)
    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: calls.append("load") or real_load(*a, **k))
    trainer = Trainer(TrainConfig(data=str(small_train_file), out=str(tmp_path / "run"), model=str(tiny_model_dir),
                                  quant="none", r_max=4, steps=1, batch_size=2, max_length=64))
    try:
        trainer.setup()
    finally:
        trainer.cleanup()
    assert calls[:2] == ["map", "load"]
