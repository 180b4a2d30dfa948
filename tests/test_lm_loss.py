"""Faster training computations give the plain model's loss and gradients: fused head + cross-entropy,
packed rows, 16-bit embeddings (issue 12, part 3)."""
from __future__ import annotations

import json

import pytest
import torch

from core.lm_loss import LinearCrossEntropy, causal_lm_loss, fused_head_supported, model_loss
from core.packing import pack, plan_rows
from core.prompting import EncodedExample, collate
from core.qdylora import qdylora_layers, set_rank
from core.qdylora.inject import set_example_ranks
from core.train import TrainConfig, Trainer, train

# Answers of very different lengths, so that short examples share a row when packed.
LONG = " ".join(["Item 1 costs 3 euros and ships in two days with tracking included for free."] * 6)
ROWS = [("What is item 1?", LONG),
        ("Hi?", "Hello."), ("Name?", "Quill."), ("What is item 2?", "Item 2 costs 6 euros."),
        ("Is it open on Sundays and public holidays?", "Yes, from ten to four, and the phone line stays open too."),
        ("Ok?", "Yes.")]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in ROWS) + "\n")
    return path


def trainer_for(model_dir, data, out, **overrides) -> Trainer:
    values = dict(data=str(data), out=str(out), model=str(model_dir), quant="none", r_max=4, steps=2, batch_size=6,
                  max_length=192, dropout=0.0)
    trainer = Trainer(TrainConfig(**(values | overrides)))
    trainer.setup()
    gen = torch.Generator().manual_seed(0)
    for layer in qdylora_layers(trainer.model).values():   # B starts at zero: give every rank an effect
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=gen) * 0.05
    return trainer


def loss_and_grads(trainer: Trainer, compute) -> tuple[float, torch.Tensor]:
    trainer.model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in trainer.params])


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fused_loss_and_packed_rows_give_the_model_loss_and_gradients(tiny_model_dir, mixed_data, tmp_path, quant):
    trainer = trainer_for(tiny_model_dir, mixed_data, tmp_path / "run", quant=quant)
    assert trainer.fused_loss and trainer.packed                      # both passed the setup check
    examples = trainer._micro_examples(0)
    pad = trainer.tokenizer.pad_token_id
    packed = pack(examples, pad)
    assert any(len(row) > 1 for row in packed.rows)                  # short examples really share rows
    assert len(packed.rows) < len(examples)
    padded_batch = trainer._to_device(collate(examples, pad))
    packed_batch = trainer._to_device(packed.tensors)
    set_rank(trainer.model, 3)
    reference, grads = loss_and_grads(trainer, lambda: trainer.model(**padded_batch).loss)
    for batch in (padded_batch, packed_batch):
        for fn in (causal_lm_loss, model_loss):
            loss, g = loss_and_grads(trainer, lambda: fn(trainer.model, batch).loss)
            assert loss == pytest.approx(reference, rel=1e-5)
            torch.testing.assert_close(g, grads, rtol=1e-4, atol=1e-6)
    trainer.cleanup()


def test_examples_at_different_ranks_never_share_a_row_and_keep_their_rank(tiny_model_dir, mixed_data, tmp_path):
    trainer = trainer_for(tiny_model_dir, mixed_data, tmp_path / "run")
    examples = trainer._micro_examples(0)
    ranks = [1, 4, 1, 4, 1, 4]
    pad = trainer.tokenizer.pad_token_id
    packed = pack(examples, pad, ranks)
    for row, rank in zip(packed.rows, packed.row_ranks):
        assert {ranks[i] for i in row} == {rank}
    set_example_ranks(trainer.model, ranks)
    reference, grads = loss_and_grads(trainer, lambda: trainer.model(**trainer._to_device(collate(examples, pad))).loss)
    set_example_ranks(trainer.model, packed.row_ranks)
    loss, g = loss_and_grads(trainer, lambda: causal_lm_loss(trainer.model, trainer._to_device(packed.tensors)).loss)
    assert loss == pytest.approx(reference, rel=1e-5)
    torch.testing.assert_close(g, grads, rtol=1e-4, atol=1e-6)
    trainer.cleanup()


def test_packed_and_padded_runs_train_the_same_adapter(tiny_model_dir, mixed_data, tmp_path):
    """Same examples in the same steps: only float rounding tells the two batchings apart (dropout off)."""
    from safetensors.torch import load_file

    runs = {}
    for batching in ("packed", "padded"):
        out = tmp_path / batching
        result = train(TrainConfig(data=str(mixed_data), out=str(out), model=str(tiny_model_dir), quant="none", r_max=4,
                                   steps=3, batch_size=3, max_length=192, dropout=0.0, lr=1e-3, batching=batching))
        assert result.status == "completed"
        runs[batching] = (result.final_loss, load_file(str(out / "adapter" / "adapter.safetensors")))
        config = json.loads((out / "config.json").read_text())
        assert config["execution"]["batching"] == batching and config["train"]["batching"] == batching
    assert runs["packed"][0] == pytest.approx(runs["padded"][0], rel=1e-5)
    for key, value in runs["padded"][1].items():
        torch.testing.assert_close(runs["packed"][1][key], value, rtol=1e-4, atol=1e-6)


def test_runs_saved_before_packing_resume_padded():
    assert TrainConfig.from_dict({"data": "d", "out": "o"}).batching == "padded"
    assert TrainConfig(data="d", out="o").batching == "packed"
    with pytest.raises(Exception, match="batching must be one of"):
        TrainConfig(data="d", out="o", batching="sorted")


def test_linear_cross_entropy_matches_logits_then_cross_entropy_across_vocabulary_slices(monkeypatch):
    import core.lm_loss as lm

    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 64)    # many row and vocabulary slices
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(37, 16, generator=gen) * 3).requires_grad_()
    weight = torch.randn(101, 16, generator=gen)
    targets = torch.randint(0, 101, (37,), generator=gen)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    expected.backward()
    want = hidden.grad.clone()
    hidden.grad = None
    loss = LinearCrossEntropy.apply(hidden, weight.to(torch.bfloat16).float(), targets)
    ours = LinearCrossEntropy.apply(hidden, weight, targets)
    ours.backward()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-7)
    assert loss.item() != ours.item()                  # the weight is really used


def test_loss_slices_bound_both_the_logits_and_the_widened_head_slice():
    from core.lm_loss import CHUNK_ELEMENTS, slice_shape

    for n, width, vocab in [(128, 2048, 49152), (1000, 576, 49152), (1, 8192, 256000), (50_000, 64, 1000), (3, 16, 10)]:
        rows, cols = slice_shape(n, width, vocab)
        assert 1 <= rows <= n and 1 <= cols <= vocab
        assert rows * cols <= CHUNK_ELEMENTS and cols * width <= CHUNK_ELEMENTS
    assert slice_shape(3, 16, 10) == (3, 10)      # small problems stay one slice


def test_linear_cross_entropy_in_16_bits_rounds_logits_as_the_model_head_does():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 50, (9,), generator=gen)
    expected = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)
    ours = LinearCrossEntropy.apply(hidden, weight, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    ours.backward()
    assert hidden.grad.dtype == torch.bfloat16


def test_a_model_whose_logits_are_not_head_of_hidden_falls_back(tiny_model_dir, mixed_data, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_model_dir, mixed_data, tmp_path / "ok")
    assert fused_head_supported(trainer.model)
    trainer.model.config.final_logit_softcapping = 30.0
    assert not fused_head_supported(trainer.model)
    trainer.cleanup()
    # A model the checks cannot see through: its loss is scaled after the head. The setup check catches it.
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * 1.5
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled)
    trainer = trainer_for(tiny_model_dir, mixed_data, tmp_path / "scaled")
    assert not trainer.fused_loss and trainer.packed   # packing is checked against the model's own (scaled) loss
    assert "plain computation" in (tmp_path / "scaled" / "train.log").read_text()
    trainer.cleanup()


def test_labelled_nll_equals_the_full_logits_nll(tiny_model_dir, mixed_data, tmp_path, monkeypatch):
    """The sweep's reference NLL with the head only on reference positions, in slices of rows."""
    import core.lm_loss as lm
    from core.lm_loss import labelled_nll
    from core.prompting import token_nll

    trainer = trainer_for(tiny_model_dir, mixed_data, tmp_path / "run")
    batch = collate(trainer._micro_examples(0), trainer.tokenizer.pad_token_id)
    set_rank(trainer.model, 3)
    trainer.model.eval()
    with torch.no_grad():
        want_sums, want_counts = token_nll(trainer.model, batch)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 7 * trainer.model.config.vocab_size)   # slices of 7 rows
    sums, counts = labelled_nll(trainer.model, batch)
    assert counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)
    trainer.cleanup()


def test_labelled_nll_through_a_peft_wrapper_equals_the_full_logits_nll(tiny_model_dir, mixed_data):
    """A PeftModel's `base_model` is its LoRA wrapper (it returns logits): the decoder is found beneath it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.lm_loss import labelled_nll
    from core.prompting import encode_example, token_nll

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    assert fused_head_supported(model, training=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = collate([encode_example(tokenizer, p, r, 64) for p, r in ROWS[1:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        want_sums, want_counts = token_nll(model, batch)
    sums, counts = labelled_nll(model, batch)
    assert counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)


def test_plan_rows_first_fit_longest_first():
    assert plan_rows([10, 3, 4, 6], 10) == [[0], [3, 2], [1]]
    assert plan_rows([5, 5, 5], 10, groups=[1, 2, 1]) == [[0, 2], [1]]


def test_position_ids_restart_per_example_and_first_labels_are_ignored():
    examples = [EncodedExample([1, 2, 3, 4, 5, 6], [-100, -100, 3, 4, 5, 6], False),
                EncodedExample([7, 8, 9], [-100, 8, 9], False), EncodedExample([10, 11], [10, 11], False)]
    packed = pack(examples, pad_id=0)
    assert packed.rows == [[0], [1, 2]] and packed.tokens == 11
    t = packed.tensors
    assert t["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert t["labels"].tolist() == [[-100, -100, 3, 4, 5, 6], [-100, 8, 9, -100, 11, -100]]


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in bfloat16, as most checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_embeddings_and_head_of_a_4bit_base_are_kept_in_16_bits_with_the_same_results(bf16_model_dir, mixed_data, tmp_path):
    from core.lowmem import Upcast16Embedding, store_frozen_embeddings_16bit
    from core.models import model_footprint_bytes

    trainer = trainer_for(bf16_model_dir, mixed_data, tmp_path / "run", quant="nf4")
    model = trainer.model
    assert trainer.narrowed == {"embeddings": "bfloat16", "head": "bfloat16"}
    assert isinstance(model.get_input_embeddings(), Upcast16Embedding)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight   # still tied
    narrow_bytes = model_footprint_bytes(model)
    batch = trainer._micro_batch(0)
    set_rank(model, 2)
    ours = loss_and_grads(trainer, lambda: causal_lm_loss(model, batch).loss)
    logits_16 = model(**batch).logits
    # Widen them again: every number must be the same.
    weight = model.get_input_embeddings().weight
    weight.data = weight.data.float()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.__class__ = module.__class__.__mro__[1]
    assert model_footprint_bytes(model) > narrow_bytes
    wide = loss_and_grads(trainer, lambda: causal_lm_loss(model, batch).loss)
    assert ours[0] == wide[0]
    torch.testing.assert_close(ours[1], wide[1], rtol=0, atol=0)
    torch.testing.assert_close(logits_16, model(**batch).logits, rtol=0, atol=0)
    trainer.cleanup()
    # float32 weights that 16 bits cannot hold exactly stay as they are
    from transformers import AutoModelForCausalLM

    f32 = AutoModelForCausalLM.from_pretrained(trainer.cfg.model, dtype=torch.float32)
    with torch.no_grad():
        f32.get_input_embeddings().weight.add_(1e-4)
    assert store_frozen_embeddings_16bit(f32) == {}
