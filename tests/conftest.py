"""Shared fixtures: offline hub settings, a tiny random Llama built from a config."""
from __future__ import annotations

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def make_tiny_model_folder(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama with the default model's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import default_model_folder, load_tokenizer

    tokenizer = load_tokenizer(str(default_model_folder()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def small_train_file(tmp_path_factory) -> Path:
    """A handful of prompt/response pairs (enough for a few steps)."""
    import json

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"What is item {i}?", "response": f"Item {i} costs {i * 3} euros."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def finished_tiny_run(tiny_model_dir, small_train_file, tmp_path_factory) -> Path:
    """A completed 2-step run (r_max 4, no quantization) on the tiny model. Shared: tests
    must not change it (the corpus and fault tests assert that they do not)."""
    from core.train import TrainConfig, train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(data=str(small_train_file), out=str(out), model=str(tiny_model_dir), quant="none", r_max=4,
                      steps=2, batch_size=2, max_length=48, checkpoint_every=1))
    return out


@pytest.fixture
def cli_in_process(capsys):
    """Run `main()` here (no interpreter start-up), restoring the signal handlers it installs."""
    from core.cli import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def call(*args):
        try:
            code = main(list(args))
        except SystemExit as exc:     # argparse refusals (usage errors) exit from inside parse_args
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.err

    yield call
    for sig, handler in saved.items():
        signal.signal(sig, handler)
