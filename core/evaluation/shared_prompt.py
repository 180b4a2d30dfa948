"""Reference NLL and greedy answer from one pass over each prompt.

A sweep scores each prompt twice at every rank: the reference's negative log-likelihood
(teacher forcing over prompt + reference) and a greedy answer (prefill of the prompt,
then decoding). Both start by running the model over the same prompt tokens (44 % of a
prompt + reference on the sample data). Here the prompts of a batch (left-padded, as
generation wants them) are run once with a key/value cache, all but their last token;
the reference continues from that cache for the NLL (the last prompt token first, its
output predicting the reference's first token), the cache is put back as it was, and
generation continues from it. Same numbers as the two separate passes up to float
rounding (tests/test_sweep_speed.py); models whose cache is not the plain per-layer
kind, or whose logits are not head(hidden states), take the two separate passes.
"""
from __future__ import annotations

import torch
from torch import nn

from core.lm_loss import decoder_of, fused_head_supported, nll_from_hidden


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate makes them for left-padded rows."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def _plain_cache(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


@torch.no_grad()
def nll_and_answers(model: nn.Module, tokenizer, prompts: dict[str, torch.Tensor], references: list[list[int]] | None,
                    max_new_tokens: int | None) -> tuple[list[tuple[float, int]] | None, list[str] | None]:
    """For a batch of prompts (core.runs.encode_prompts): per prompt (summed NLL of its reference token ids, their
    count) if `references`, and its greedy answer if `max_new_tokens`. None where the shared pass does not apply."""
    from core.runs import generate_encoded

    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    if ids.shape[1] < 2 or not fused_head_supported(model, training=False):
        return None, None
    model.eval()
    body = model.base_model
    prefix = body(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=_left_padded_positions(mask)[:, :-1],
                  use_cache=True)
    cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
    if not _plain_cache(cache):
        return None, None
    nll = None
    if references is not None:
        saved = [(layer.keys, layer.values) for layer in cache.layers]
        nll = _reference_nll(model, ids, mask, cache, references)
        for layer, (keys, values) in zip(cache.layers, saved):   # the prompt's cache as it was before the references
            layer.keys, layer.values = keys, values
    answers = None
    if max_new_tokens:
        answers = generate_encoded(model, tokenizer, {"input_ids": ids, "attention_mask": mask},
                                   max_new_tokens=max_new_tokens, cache=cache)
    return nll, answers


def _reference_nll(model, ids, mask, cache, references: list[list[int]]) -> list[tuple[float, int]]:
    batch, width = ids.shape
    longest = max(1, max(len(r) for r in references))
    ref = torch.zeros((batch, longest), dtype=ids.dtype, device=ids.device)
    ref_mask = torch.zeros((batch, longest), dtype=mask.dtype, device=ids.device)
    for i, tokens in enumerate(references):
        ref[i, :len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        ref_mask[i, :len(tokens)] = 1
    full_mask = torch.cat([mask, ref_mask], dim=1)
    positions = _left_padded_positions(full_mask)[:, width - 1:]
    step = torch.cat([ids[:, -1:], ref], dim=1)
    hidden = decoder_of(model)(input_ids=step, attention_mask=full_mask, position_ids=positions, cache=cache,
                              use_cache=True).last_hidden_state[:, :-1]            # output j predicts reference token j
    selected = ref_mask.bool()
    token_nll = nll_from_hidden(model, hidden[selected], ref[selected])
    sums = torch.zeros(batch, dtype=torch.float32, device=ids.device).index_add_(0, selected.nonzero()[:, 0], token_nll)
    return [(float(s), int(c)) for s, c in zip(sums, selected.sum(dim=1))]
