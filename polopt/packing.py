"""A RolloutBatch without its padding, each prompt read once: the packed layout of the update.

A collated batch (polopt/batch.py) pads every row to the widest prompt and the longest answer of the
whole batch and repeats each group's prompt K times. `pack_groups` lays the same tokens out as
rows of one group each: the prompt once, then as many of its answers as fit in `max_row_tokens`,
back to back (a group that does not fit continues in a further row, which repeats the prompt):

    row    [ q_1 .. q_p | a1_1 .. a1_n1 | a2_1 .. a2_n2 | ... | pad ]
    pos      0  .. p-1    p  .. p+n1-1    p  .. p+n2-1          0
    attends  causal       q, a1 causal    q, a2 causal          itself

Each answer sees its prompt and its own earlier tokens, at the positions it had when it was
sampled, so every log-prob equals the padded layout's up to float rounding; the prompt's hidden
states are computed once per row and their gradients summed over the answers, which is the same
gradient. `rows[b, t], positions[b, t]` say where the hidden state that predicts response token t
of batch row b sits: the prompt's last token for t = 0, the answer's token t - 1 after that (and
the prompt's last token again on padding, a finite value the loss masks out).

What it saves is measured in benchmarks/results/step_vs_trl.md (`pack_sequences=true`). The cost
is a dense [L, L] attention mask per row, so it suits rows of up to a few thousand tokens (with a
dense mask, GPU attention cannot use the flash kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polopt.batch import RolloutBatch

__all__ = ["PackedRows", "pack_groups"]


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # [R, L]
    mask: torch.Tensor  # [R, L, L] True where a token may attend
    input_pos: torch.Tensor  # [R, L]
    rows: torch.Tensor  # [B, T] packed row of the hidden state predicting response token t of row b
    positions: torch.Tensor  # [B, T] its position in that row


def pack_groups(batch: RolloutBatch, max_row_tokens: int, pad_id: int = 0) -> PackedRows:
    """The packed layout of `batch` (see the module docstring), rows at most `max_row_tokens` long."""
    P, T = batch.prompt_len, batch.response_len
    device = batch.input_ids.device
    ids, attention_mask = batch.input_ids.cpu(), batch.attention_mask.cpu()  # built on CPU, moved once
    prompt_lens = attention_mask[:, :P].sum(1).tolist()
    response_lens = attention_mask[:, P:].sum(1).tolist()
    members: dict[int, list[int]] = {}
    for b, g in enumerate(batch.group_ids.tolist()):
        members.setdefault(g, []).append(b)

    row_tokens: list[list[torch.Tensor]] = []  # per row: prompt, then answers
    row_segments: list[list[int]] = []  # per row: the length of each piece
    rows = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    t = torch.arange(T)
    for g, bs in members.items():
        p = prompt_lens[bs[0]]
        prompt = ids[bs[0], P - p : P]
        if p + max(response_lens[b] for b in bs) > max_row_tokens:
            raise ValueError(
                f"pack_groups: group {g} needs rows of {p + max(response_lens[b] for b in bs)} tokens "
                f"(prompt + longest answer), more than max_row_tokens={max_row_tokens}"
            )
        used = None  # tokens in the group's current row; None before its first row
        for b in bs:
            if prompt_lens[b] != p or not torch.equal(ids[b, P - p : P], prompt):
                raise ValueError(f"pack_groups: row {b} of group {g} has a different prompt from row {bs[0]}")
            n = response_lens[b]
            if used is None or used + n > max_row_tokens:
                row_tokens.append([prompt])
                row_segments.append([p])
                used = p
            start = used
            row_tokens[-1].append(ids[b, P : P + n])
            row_segments[-1].append(n)
            used += n
            rows[b] = len(row_tokens) - 1
            # t = 0 is predicted by the prompt's last token; t >= 1 by the answer's token t - 1.
            positions[b] = torch.where((t == 0) | (t >= n), p - 1, start + t - 1)

    R, L = len(row_tokens), max(sum(s) for s in row_segments)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    input_pos = torch.zeros((R, L), dtype=torch.long)
    segment = torch.full((R, L), -1, dtype=torch.long)  # 0 prompt, i >= 1 the i-th answer, -1 padding
    for r, (pieces, lengths) in enumerate(zip(row_tokens, row_segments)):
        input_ids[r, : sum(lengths)] = torch.cat(pieces)
        start, p = 0, lengths[0]
        for i, n in enumerate(lengths):
            segment[r, start : start + n] = i
            input_pos[r, start : start + n] = torch.arange(n) + (0 if i == 0 else p)
            start += n
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal & (query >= 0) & ((key == query) | (key == 0))
    mask |= torch.eye(L, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
    return PackedRows(*(x.to(device) for x in (input_ids, mask, input_pos, rows, positions)))
