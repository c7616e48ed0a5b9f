"""A RolloutBatch without its padding, each prompt read once: the packed layout of the update.

A collated batch (polopt/batch.py) pads every row to the widest prompt and the longest answer of the
whole batch and repeats each group's prompt K times. `pack_groups` lays the same tokens out as
segments — a group's prompt once, then its answers back to back — filled into rows of at most
`max_row_tokens` tokens one after another: a row holds as many segments as fit, and a group whose
next answer does not fit in the row continues in a new segment on the next row, repeating its prompt:

    row    [ q_1 .. q_p | a1_1 .. a1_n1 | a2_1 .. a2_n2 | q'_1 .. q'_p' | a'1_1 .. | ... | pad ]
    pos      0  .. p-1    p  .. p+n1-1    p  .. p+n2-1    0   ..  p'-1   p' ..            0
    attends  causal       q, a1 causal    q, a2 causal    causal          q', a'1 causal  itself

Each answer sees its prompt and its own earlier tokens, at the positions it had when it was
sampled, and nothing of the other segments in its row, so every log-prob equals the padded
layout's up to float rounding; the prompt's hidden states are computed once per segment and their
gradients summed over its answers, which is the same gradient. `rows[b, t], positions[b, t]` say
where the hidden state that predicts response token t of batch row b sits: its prompt's last token
for t = 0, the answer's token t - 1 after that (and the prompt's last token again on padding, a
finite value the loss masks out).

The cost is a dense [L, L] attention mask per row: attention work grows with the row length while
the padding saved does not, so rows of a few times the widest prompt + answer are the sweet spot
(`default_row_tokens`); with a dense mask, GPU attention cannot use the flash kernel. What it saves is
measured in benchmarks/results/step_roofline.md and step_vs_trl.md (`pack_sequences=true`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polopt.batch import RolloutBatch

__all__ = ["PackedRows", "default_row_tokens", "pack_groups"]

# Rows of up to this many times the batch's widest prompt + answer: the attention work per token
# grows with the row, the padding saved stops growing once a row holds a few segments.
ROW_WIDTHS = 4


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # [R, L]
    mask: torch.Tensor  # [R, L, L] True where a token may attend
    input_pos: torch.Tensor  # [R, L]
    rows: torch.Tensor  # [B, T] packed row of the hidden state predicting response token t of row b
    positions: torch.Tensor  # [B, T] its position in that row


def default_row_tokens(batch: RolloutBatch) -> int:
    """ROW_WIDTHS × the widest prompt + answer of `batch`: the default row length."""
    P = batch.prompt_len
    widest = batch.attention_mask[:, :P].sum(1) + batch.attention_mask[:, P:].sum(1)
    return ROW_WIDTHS * int(widest.max())


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

    row_tokens: list[list[torch.Tensor]] = []  # per row: its pieces (prompts and answers) in order
    row_pieces: list[list[tuple[int, int, int]]] = []  # per row, per piece: (segment, answer index or 0, length)
    rows = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    t = torch.arange(T)
    used, segments_in_row = max_row_tokens, 0  # of the current row (full: the first segment opens a row)
    for g, bs in members.items():
        p = prompt_lens[bs[0]]
        prompt = ids[bs[0], P - p : P]
        if p + max(response_lens[b] for b in bs) > max_row_tokens:
            raise ValueError(
                f"pack_groups: group {g} needs rows of {p + max(response_lens[b] for b in bs)} tokens "
                f"(prompt + longest answer), more than max_row_tokens={max_row_tokens}"
            )
        segment_open = False  # whether the current row's last segment is this group's
        for b in bs:
            if prompt_lens[b] != p or not torch.equal(ids[b, P - p : P], prompt):
                raise ValueError(f"pack_groups: row {b} of group {g} has a different prompt from row {bs[0]}")
            n = response_lens[b]
            if not (segment_open and used + n <= max_row_tokens):
                if used + p + n > max_row_tokens:
                    row_tokens.append([])
                    row_pieces.append([])
                    used, segments_in_row = 0, 0
                segment, segments_in_row = segments_in_row, segments_in_row + 1
                row_tokens[-1].append(prompt)
                row_pieces[-1].append((segment, 0, p))
                prompt_end, used, segment_open = used + p, used + p, True
            start = used
            row_tokens[-1].append(ids[b, P : P + n])
            row_pieces[-1].append((segment, len(row_pieces[-1]), n))
            used += n
            rows[b] = len(row_tokens) - 1
            # t = 0 is predicted by the prompt's last token; t >= 1 by the answer's token t - 1.
            positions[b] = torch.where((t == 0) | (t >= n), prompt_end - 1, start + t - 1)

    R, L = len(row_tokens), max(sum(n for _, _, n in pieces) for pieces in row_pieces)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    input_pos = torch.zeros((R, L), dtype=torch.long)
    segment_of = torch.full((R, L), -1, dtype=torch.long)  # the segment of each token, -1 padding
    piece_of = torch.full((R, L), -1, dtype=torch.long)  # 0 a prompt, i >= 1 an answer
    for r, (tokens, pieces) in enumerate(zip(row_tokens, row_pieces)):
        input_ids[r, : sum(n for _, _, n in pieces)] = torch.cat(tokens)
        start = 0
        for segment, piece, n in pieces:
            if piece == 0:
                p = n
            segment_of[r, start : start + n], piece_of[r, start : start + n] = segment, piece
            input_pos[r, start : start + n] = torch.arange(n) + (0 if piece == 0 else p)
            start += n
    same_segment = (segment_of[:, :, None] == segment_of[:, None, :]) & (segment_of[:, :, None] >= 0)
    own_piece_or_prompt = (piece_of[:, None, :] == piece_of[:, :, None]) | (piece_of[:, None, :] == 0)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal & same_segment & own_piece_or_prompt
    mask |= torch.eye(L, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
    return PackedRows(*(x.to(device) for x in (input_ids, mask, input_pos, rows, positions)))
