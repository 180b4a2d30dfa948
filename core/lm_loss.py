"""The training loss without the full logits: the output head only where the loss is, in vocabulary chunks.

A causal LM's loss is the mean cross-entropy of the tokens after each labelled position.
`model(**batch).loss` computes float32 logits for every position of every row (prompt,
padding and answer: 448 × 49152 floats for one default micro-batch), then their
log-softmax and its gradient. Here the decoder body runs as usual, and the head is
applied only to the positions whose next token is labelled (the answers: ~55 % of the
tokens of the sample data), by `LinearCrossEntropy`, one slice of the vocabulary at a
time with an online log-sum-exp: the gradient for the hidden states is accumulated in
the same pass, so no [tokens × vocabulary] tensor is ever held and nothing is computed
twice. The loss and the gradients are those of `model(**batch).loss` up to float
rounding (tests/test_lm_loss.py), so the head's weights may even be stored in 16 bits
(`core.lowmem`) and are widened one slice at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IGNORE = -100
# Largest slice of logits held at once (elements): 8 M floats = 32 MB.
CHUNK_ELEMENTS = 8 * 2**20


@dataclass
class LossOutput:
    loss: torch.Tensor            # mean cross-entropy over the labelled next tokens
    logits: torch.Tensor | None   # [labelled tokens × vocabulary] when asked for (distillation), else None
    tokens: int                   # labelled tokens the mean is over


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack under the output head (None if the model has none), through a PEFT wrapper.

    A PeftModel's own `base_model` is its LoRA wrapper around the whole causal LM (which returns
    logits, not hidden states); the decoder is the wrapped model's `base_model`.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "base_model", None)
    return None if body is None or body is inner else body


def fused_head_supported(model: nn.Module, training: bool = True) -> bool:
    """Whether the logits are exactly head(decoder hidden states): a bias-free linear head (frozen, for
    training), and nothing after it.

    (Soft-capped or scaled logits, as some architectures have, would be missed here; the
    trainer also checks the result against model(**batch).loss once before it relies on it.)
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = decoder_of(model)
    cfg = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or (training and head.weight.requires_grad):
        return False
    if body is None:
        return False
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return False
    return True


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], with_logits: bool = False) -> LossOutput:
    """The mean next-token cross-entropy over labelled tokens, computing the head only there.

    `batch` holds input_ids and labels, and attention_mask and/or position_ids as the
    model takes them (padded rows, or packed rows: see core.packing).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder_of(model)(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"]
    targets = labels[:, 1:]
    selected = targets != IGNORE
    h = hidden[:, :-1][selected]
    t = targets[selected]
    head = model.get_output_embeddings()
    if with_logits:
        logits = nn.functional.linear(h, head.weight.to(h.dtype)).float()
        loss = nn.functional.cross_entropy(logits, t)
        return LossOutput(loss, logits, int(t.numel()))
    return LossOutput(LinearCrossEntropy.apply(h, head.weight, t), None, int(t.numel()))


@torch.no_grad()
def labelled_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed negative log-likelihood of its labelled tokens, and their count (teacher forcing).

    As core.prompting.token_nll, with the head only on the positions that predict a labelled
    token and the logits made a slice of rows at a time (a batch of 32 prompts with their
    references would otherwise hold ~1 GB of float32 logits).
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if not fused_head_supported(model, training=False):
        from core.prompting import token_nll

        return token_nll(model, batch)
    hidden = decoder_of(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE
    nll = nll_from_hidden(model, hidden[:, :-1][selected], targets[selected])
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=device).index_add_(0, selected.nonzero()[:, 0], nll)
    return sums, selected.sum(dim=1)


@torch.no_grad()
def nll_from_hidden(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target | hidden state) per row, through the output head a slice of rows at a time."""
    weight = model.get_output_embeddings().weight
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    nll = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    head = weight.to(hidden.dtype)   # once, not per slice (a 16-bit head over float32 states is widened here)
    for r0 in range(0, targets.shape[0], rows):
        logits = nn.functional.linear(hidden[r0:r0 + rows], head).float()
        nll[r0:r0 + rows] = nn.functional.cross_entropy(logits, targets[r0:r0 + rows], reduction="none")
    return nll


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor], with_logits: bool = False) -> LossOutput:
    """The same, through the model's own forward and loss (full logits); the fallback of `causal_lm_loss`."""
    out = model(**batch)
    selected = batch["labels"][:, 1:] != IGNORE
    logits = out.logits[:, :-1][selected] if with_logits else None
    return LossOutput(out.loss, logits, int(selected.sum()))


def slice_shape(n: int, width: int, vocab: int) -> tuple[int, int]:
    """(rows, vocabulary columns) per slice of the fused loss: neither the logits slice (rows × cols)
    nor the head slice widened to the compute dtype (cols × width) exceeds CHUNK_ELEMENTS.

    Bounding only the logits let a short batch take the whole vocabulary at once: a float32 copy
    of a 16-bit 49k × 2048 head (402 MB at 1 B parameters) at every step.
    """
    rows = max(1, min(n, CHUNK_ELEMENTS // 1024))
    cols = max(1, min(vocab, CHUNK_ELEMENTS // rows, CHUNK_ELEMENTS // max(1, width)))
    return rows, cols


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i Wᵀ, t_i) for a frozen W, and its gradient for h, in one pass over vocabulary slices.

    For each slice W_v the logits l = h W_vᵀ are made, then dropped: a running maximum m,
    a running sum s = Σ exp(l - m) and a running a = Σ exp(l - m) W_v (rescaled whenever
    m grows) give log-sum-exp = m + log s and ∂CE/∂h = a / s - W_t.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, width = hidden.shape
        vocab = weight.shape[0]
        if n == 0:
            ctx.save_for_backward(torch.zeros_like(hidden, dtype=torch.float32))
            ctx.n, ctx.dtype = 1, hidden.dtype
            return hidden.new_zeros((), dtype=torch.float32)
        # Logits in the hidden states' dtype, as the model's own head makes them (bfloat16 on a GPU), then float32.
        h = hidden.detach()
        rows, cols = slice_shape(n, width, vocab)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        for r0 in range(0, n, rows):
            hr, tr = h[r0:r0 + rows], targets[r0:r0 + rows]
            m = torch.full((hr.shape[0],), -torch.inf, device=h.device)
            s = torch.zeros(hr.shape[0], device=h.device)
            acc = torch.zeros(hr.shape, dtype=torch.float32, device=h.device)
            target_logit = torch.zeros(hr.shape[0], device=h.device)
            for v0 in range(0, vocab, cols):
                w = weight[v0:v0 + cols].detach().to(h.dtype)
                logits = (hr @ w.T).float()
                hit = (tr >= v0) & (tr < v0 + w.shape[0])
                if hit.any():
                    target_logit[hit] = logits[hit, tr[hit] - v0]
                m_new = torch.maximum(m, logits.max(dim=1).values)
                rescale = torch.exp(m - m_new)
                logits.sub_(m_new[:, None]).exp_()
                s = s * rescale + logits.sum(dim=1)
                acc.mul_(rescale[:, None]).addmm_(logits, w.float())
                m = m_new
            lse = m + torch.log(s)
            total += (lse - target_logit).double().sum()
            grad[r0:r0 + rows] = acc / s[:, None] - weight[tr].detach().float()
        ctx.save_for_backward(grad)
        ctx.n, ctx.dtype = n, hidden.dtype
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * (grad_output / ctx.n)).to(ctx.dtype), None, None
