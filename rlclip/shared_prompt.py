"""One forward per prompt for the G completions that share it (``train.shared_prompt``).

A GRPO micro-batch holds several completions of the same prompt, and the
plain forward runs that prompt once per completion: on the benchmark of
eval/bench/step_vs_trl.py (44 prompt tokens, 4 completions of 32 tokens)
704 of the 1,216 tokens of the update pass are copies of 4 prompts. Here each
prompt is run once, packed in one row with its completions behind it:

    [ prompt | completion 1 | completion 2 | ... | completion g ]

under a 4D attention mask in which completion j sees the prompt and its own
earlier tokens, never another completion's, and at the positions (RoPE ids)
it would have in its own sequence. Every real token then sees exactly the
keys, values and positions of the plain forward, so its hidden state is the
same function of the weights (the same values up to the order of float
sums), and the gradient of the shared prompt is the sum over its
completions, as it is when the prompt is copied. This is the shared-prefix
forward of Prefix Grouper (Liu et al., 2025, arXiv:2506.05433) for GRPO.

Each completion is packed up to its last real token (``completion_mask``),
so completions that ended early cost nothing after their end; the hidden
states returned at masked positions are 0 (every consumer masks them).

The dense mask makes attention cost quadratic in the packed length, so the
packed layout is used only when its estimated FLOPs (linear layers per
token, attention per query-key pair) are below the plain forward's: it wins
when prompts are long against the completions, and loses for many long
completions of a short prompt. It needs an attention implementation that
takes a 4D mask as given (``sdpa``: boolean; ``eager``: additive); others
get the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
PACKED_COST_MARGIN = 0.9
"""Pack only when the packed forward's estimated FLOPs are below this fraction of the plain one's."""


@dataclass
class PackedBatch:
    """A micro-batch laid out as one row per distinct prompt."""

    input_ids: Tensor
    """``[G, L]`` prompt tokens then each completion's tokens, padded on the right."""
    position_ids: Tensor
    """``[G, L]`` each token's position in its own (unpacked) sequence."""
    attention_mask: Tensor
    """``[G, 1, L, L]`` True (sdpa) or 0.0 (eager) where a query may attend to a key."""
    index: Tensor
    """``[B, T]`` flat index into ``[G * L]`` of the position that predicts each completion token."""
    valid: Tensor
    """``[B, T]`` True where ``index`` points at a real prediction (inside the completion's packed length)."""


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """``[B]`` group number of each row: rows with the same prompt tokens and mask share one, numbered in
    order of first appearance."""
    keyed = prompt_ids.masked_fill(prompt_mask == 0, -1)  # [B, P]: padding compares equal only to padding
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)  # [B], numbered in sorted order
    first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), "amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(len(first), device=first.device)
    return rank[inverse]


def _packed_lengths(completion_mask: Tensor) -> Tensor:
    """``[B]`` packed length of each completion: up to and including its last real token."""
    t = torch.arange(1, completion_mask.shape[1] + 1, device=completion_mask.device)
    return (completion_mask.bool() * t).amax(1)  # [B]


def _layer_costs(model: nn.Module) -> tuple[float, float]:
    """FLOPs per token of the decoder's linear layers and per query-key pair of attention, summed over layers
    (forward; backward scales both alike)."""
    config = model.config
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2.0 * linear, 4.0 * heads * head_dim * config.num_hidden_layers


def worth_packing(model: nn.Module, groups: Tensor, prompt_mask: Tensor, completion_mask: Tensor) -> bool:
    """Whether the packed forward's estimated FLOPs are below ``PACKED_COST_MARGIN`` of the plain one's."""
    per_token, per_pair = _layer_costs(model)
    rows, width = prompt_mask.shape[0], prompt_mask.shape[1] + completion_mask.shape[1]
    plain = rows * width * per_token + rows * width**2 * per_pair
    lengths = _packed_lengths(completion_mask)  # [B]
    count = int(groups.max()) + 1
    packed_len = torch.zeros(count, dtype=torch.long, device=groups.device).index_add_(0, groups, lengths)
    first = torch.zeros(count, dtype=torch.long, device=groups.device).scatter_(
        0, groups, torch.arange(rows, device=groups.device))  # [G] a row of each group
    packed_len += prompt_mask[first].long().sum(1)
    longest = int(packed_len.max())
    packed = count * longest * per_token + count * longest**2 * per_pair
    return packed < PACKED_COST_MARGIN * plain


def pack(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
         positions: Tensor, groups: Tensor, pad_token_id: int,
         additive_dtype: torch.dtype | None = None) -> PackedBatch:
    """The packed layout of a micro-batch whose rows are grouped by ``groups [B]`` (see the module text);
    ``positions [B, P+T]`` are the plain forward's position ids, which every token keeps.

    ``additive_dtype``: build the eager attention's additive float mask in that dtype instead of sdpa's boolean.
    """
    device, count = prompt_ids.device, int(groups.max()) + 1
    rows, width = completion_ids.shape
    t = torch.arange(width, device=device)  # [T]
    lengths = _packed_lengths(completion_mask)  # [B]
    tokens, packed_pos, segments, key_ok = [], [], [], []
    index = torch.zeros(rows, width, dtype=torch.long, device=device)  # [B, T]
    for g in range(count):
        members = (groups == g).nonzero().squeeze(1)  # [g_n]
        lead = members[0]
        real = prompt_mask[lead].bool()  # [P]: the prompt's real tokens, shared by the group
        seq_ids, seq_pos = [prompt_ids[lead][real]], [positions[lead, :prompt_ids.shape[1]][real]]
        seq_seg, seq_ok = [torch.zeros_like(seq_pos[0])], [torch.ones_like(real[real])]
        offset, last_prompt = int(real.sum()), int(real.sum()) - 1
        for j, row in enumerate(members.tolist()):
            n = int(lengths[row])
            seq_ids.append(completion_ids[row, :n])
            seq_pos.append(positions[row, prompt_ids.shape[1]:prompt_ids.shape[1] + n])
            seq_seg.append(torch.full((n,), j + 1, dtype=torch.long, device=device))
            seq_ok.append(completion_mask[row, :n].bool())
            # token 0 is predicted by the prompt's last token, token t >= 1 by the completion's token t - 1
            upper = offset + n - 1 if n else last_prompt  # past the packed length: any real index (masked)
            index[row] = torch.where(t == 0, last_prompt, offset + t - 1).clamp_max(upper)
            offset += n
        tokens.append(torch.cat(seq_ids))
        packed_pos.append(torch.cat(seq_pos))
        segments.append(torch.cat(seq_seg))
        key_ok.append(torch.cat(seq_ok))
    longest = max(len(seq) for seq in tokens)
    ids = torch.full((count, longest), pad_token_id, dtype=prompt_ids.dtype, device=device)  # [G, L]
    pos = torch.zeros(count, longest, dtype=torch.long, device=device)  # [G, L]
    seg = torch.full((count, longest), -1, dtype=torch.long, device=device)  # [G, L]: -1 = row padding
    ok = torch.zeros(count, longest, dtype=torch.bool, device=device)  # [G, L]: key is a real token
    for g in range(count):
        n = len(tokens[g])
        ids[g, :n], pos[g, :n], seg[g, :n], ok[g, :n] = tokens[g], packed_pos[g], segments[g], key_ok[g]
    index += (groups * longest)[:, None]  # [B, T] into the flattened [G * L]
    valid = t[None] < lengths[:, None]  # [B, T]
    return PackedBatch(ids, pos, _attention_mask(seg, ok, additive_dtype), index, valid)


def _attention_mask(seg: Tensor, key_ok: Tensor, additive_dtype: torch.dtype | None) -> Tensor:
    """``[G, 1, L, L]``: a query sees earlier real keys of the prompt (segment 0) or of its own segment, and
    always itself (so padding rows are never all-masked, which would make NaNs in attention)."""
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()  # [L, L]
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # [G, L, L]
    allowed = (causal & same & key_ok[:, None, :]) | torch.eye(length, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]  # [G, 1, L, L]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=seg.device).masked_fill_(
        ~allowed, torch.finfo(additive_dtype).min)


def packed_mask_kind(model: nn.Module) -> str | None:
    """``sdpa`` or ``eager`` when the model's attention takes a 4D mask as given, else None."""
    config = getattr(model, "config", None)
    kind = getattr(config, "_attn_implementation", None)
    return kind if kind in ATTENTION_IMPLEMENTATIONS else None
