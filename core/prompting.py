"""Turning examples into token ids the same way for training and for generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Used only for tokenizers without a chat template (e.g. base models).
FALLBACK_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss is on the response only
    truncated: bool


def prompt_messages(prompt: str | None = None, messages: list[dict] | None = None) -> list[dict]:
    """The conversation up to (not including) the answer to be produced."""
    if messages:
        if messages[-1].get("role") == "assistant":
            return list(messages[:-1])
        return list(messages)
    return [{"role": "user", "content": prompt or ""}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "\n\n".join(m["content"] for m in messages if m.get("role") != "assistant")
    return FALLBACK_PROMPT.format(prompt=text)


def render_response(tokenizer, messages: list[dict], response: str) -> str:
    """The text that follows the rendered prompt: the answer plus the template's end-of-turn."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = render_prompt(tokenizer, messages)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
    return response + (tokenizer.eos_token or "")


def encode_example(tokenizer, prompt: str | None, response: str, max_length: int, messages: list[dict] | None = None) -> EncodedExample | None:
    """Token ids and labels; None when truncation would leave no response token."""
    msgs = prompt_messages(prompt, messages)
    prompt_ids = tokenizer(render_prompt(tokenizer, msgs), add_special_tokens=False)["input_ids"]
    # Tokenizing the response on its own keeps the prompt/response boundary exact and
    # identical to what generation sees (prompt ids, then new tokens).
    response_ids = tokenizer(render_response(tokenizer, msgs, response), add_special_tokens=False)["input_ids"]
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == -100 for label in labels):
        return None
    return EncodedExample(ids, labels, truncated)


def collate(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher forcing."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed negative log-likelihood of labelled tokens, and their counts."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    mask = shift_labels != -100
    return (losses * mask).sum(dim=1), mask.sum(dim=1)
