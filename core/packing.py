"""Packed micro-batches: several short examples in one row, each attending only to itself.

`core.prompting.collate` pads every example of a micro-batch to the longest one (9 % of
the default micro-batch is padding on the sample data, more on data of mixed lengths).
`pack` puts examples into rows no wider than that longest example (first fit,
longest first), so the work per row does not grow, and gives each example its own
position ids starting at 0. transformers reads position ids that restart inside a row as
separate sequences and masks attention between them (`find_packed_sequence_indices`), so
every example sees exactly what it saw alone; the padding left at the end of a row is a
sequence of its own that nothing attends to. The first label of every example is
ignored, because in a packed row it would otherwise be predicted from the end of the
example before it (alone, nothing predicts it). The loss is the mean over the same
labelled tokens as the padded batch, so it is the same up to float rounding
(tests/test_packing.py); the trainer verifies that once on the model it trains before
it relies on it.

Examples trained at different ranks (several ranks per step) never share a row: the
adapter's per-example rank mask works per row (`row_ranks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.prompting import EncodedExample

IGNORE = -100


@dataclass
class PackedBatch:
    tensors: dict[str, torch.Tensor]   # input_ids, labels, position_ids (for model(**tensors))
    row_ranks: list[int] | None        # the rank of each row, when examples had ranks
    rows: list[list[int]]              # example indices (into the given list) per row
    tokens: int                        # real (non-padding) tokens


def plan_rows(lengths: list[int], capacity: int, groups: list[int] | None = None) -> list[list[int]]:
    """Example indices per row: first fit, longest first, no row longer than `capacity`, one group per row."""
    groups = groups if groups is not None else [0] * len(lengths)
    rows: list[list[int]] = []
    used: list[int] = []
    row_group: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, row in enumerate(rows):
            if row_group[r] == groups[i] and used[r] + lengths[i] <= capacity:
                row.append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
            row_group.append(groups[i])
    return rows


def pack(examples: list[EncodedExample], pad_id: int, ranks: list[int] | None = None) -> PackedBatch:
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    rows = plan_rows(lengths, width, ranks)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at:at + n] = torch.tensor(examples[i].labels)
            labels[r, at] = IGNORE
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding tail: a sequence of its own
    row_ranks = [ranks[row[0]] for row in rows] if ranks is not None else None
    return PackedBatch({"input_ids": ids, "labels": labels, "position_ids": positions}, row_ranks, rows, sum(lengths))
