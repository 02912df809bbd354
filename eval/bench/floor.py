"""The machine's floor for one benchmark step (eval/bench/step_vs_trl.py): how fast the step could possibly be.

Measured in the same run as the steps, so the floor moves with the machine:

- ``peak_gflops``: float32 matmul throughput, the best of 5 timings of 8 products of 2048 x 2048 matrices
  with torch's default threads (2 * 2048^3 FLOPs each);
- ``bandwidth_gbs``: memory copy bandwidth, the best of 5 copies of a 256 MiB float32 tensor, counting the
  read and the write (2 x 256 MiB each).

Counted from the model's shapes (its ``nn.Linear`` layers, its config):

- training, one forward + backward of every sequence (prompt + completion): 6 x N x tokens for the N
  weights of the decoder's linear layers (2 per weight and token forward, 4 backward), plus attention
  12 x layers x S^2 x hidden per sequence of S tokens (QK^T and AV, forward and backward), plus the output
  layer 6 x hidden x vocab on the completion positions only (rlclip computes logits only there);
- generation, T decoding steps for B sequences: the prefill 2 x N x prompt tokens + the output layer on B
  positions, then per step the larger of its matmul time (2 x N x B + 2 x hidden x vocab x B FLOPs at the
  peak) and the time to read every weight once (all parameters, embedding included, at the bandwidth): a
  decoding step of a small batch is bound by memory, not by arithmetic.

The floor is training / peak + generation; optimizer, reward and Python overhead count as zero, so a step
can never reach it. ``floor_ratio`` = measured step / floor.

``shared_floor_s`` counts each prompt's linear-layer work once per group (training and prefill), the work
that remains when the G completions of a prompt share its forward (rlclip's ``train.shared_prompt``, its
decoding loop's one prefill per prompt); ``shared_floor_ratio`` = measured step / that floor.
"""

from __future__ import annotations

import time


def peak_gflops(size: int = 2048, products: int = 8, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * products / best / 1e9


def bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    import torch

    src = torch.ones(mib * 2**18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def step_floor(model, prompt_tokens: list[int], new_tokens: int, group_size: int, peak: float,
               bandwidth: float) -> dict[str, float]:
    """The floor of one step: ``prompt_tokens`` per prompt, ``group_size`` completions of ``new_tokens`` each.

    Also ``shared_floor_s``: the same with each prompt's linear-layer work counted once per group instead of
    once per completion, in training and in the prefill (rlclip's ``train.shared_prompt`` and its decoding loop
    do that work once, so the issue's floor, which counts every copy, is not a lower bound for them; attention
    is still counted per sequence)."""
    from torch import nn

    config = model.config
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    lengths = [p + new_tokens for p in prompt_tokens for _ in range(group_size)]
    batch = len(lengths)
    attention_and_head = (sum(12 * layers * s * s * hidden for s in lengths)
                          + 6 * hidden * vocab * batch * new_tokens)
    train = 6 * linear * sum(lengths) + attention_and_head
    shared_train = 6 * linear * (sum(prompt_tokens) + batch * new_tokens) + attention_and_head
    head_rows = 2 * hidden * vocab * batch
    per_token = max((2 * linear * batch + head_rows) / (peak * 1e9), all_bytes / (bandwidth * 1e9))
    generation = (2 * linear * group_size * sum(prompt_tokens) + head_rows) / (peak * 1e9) + new_tokens * per_token
    shared_generation = (2 * linear * sum(prompt_tokens) + head_rows) / (peak * 1e9) + new_tokens * per_token
    return {"train_tflop": train / 1e12, "train_floor_s": train / (peak * 1e9), "generation_floor_s": generation,
            "floor_s": train / (peak * 1e9) + generation,
            "shared_train_tflop": shared_train / 1e12,
            "shared_floor_s": shared_train / (peak * 1e9) + shared_generation}
