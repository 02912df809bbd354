"""Step time and peak RSS of every registered objective relative to ratio_clip (a benchmark, not a test).

One step is what the trainer does per micro-batch for the objective: the
update-pass forward through ``rlclip.policy.completion_logprobs`` with exactly
what the objective declares (entropy, TROLL's sparse support), its step
statistics, the loss and the backward. The model is a tiny Llama whose
output head has SmolLM2's shape (vocabulary 49152, hidden 576), so the
vocabulary-sized work dominates as it does in a 135M model. The behaviour
pass (no grad) runs once per objective before the timed steps; objectives
that need a reference get the behaviour log-probs as reference (the
reference forward is the trainer's, the same for every KL objective).

All objectives run in one process, one after another, in an order that
alternates over ``--rounds``; before each, the peak RSS (VmHWM) is reset, so
each row's peak is that objective's own. The table gives medians over all
timed steps and the ratios to ratio_clip.

    python eval/bench/objectives.py                   # writes eval/results/objectives.md
    python eval/bench/objectives.py --repeats 5 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from step_vs_trl import peak_rss_mb, reset_peak, rss_mb, write_markdown  # noqa: E402


def make_batch(model, args, generator):
    import torch

    vocab = model.config.vocab_size
    pid = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=generator)  # [B, P]
    cid = torch.randint(3, vocab, (args.batch, args.completion_len), generator=generator)  # [B, T]
    adv = torch.randn(args.batch, 1, generator=generator).expand(-1, args.completion_len).contiguous()  # [B, T]
    return pid, torch.ones_like(pid), cid, torch.ones_like(cid), adv


def measure(name: str, model, data, args) -> dict:
    import torch

    from rlclip.objectives import PolicyBatch, build_objective
    from rlclip.objectives.base import Reducer
    from rlclip.policy import completion_logprobs

    pid, pm, cid, cm, adv = data
    objective = build_objective(name)
    spec = getattr(objective, "support_spec", None) if "support" in objective.needs else None
    need_entropy = "entropy" in objective.needs or "entropy" in objective.step_needs
    gc.collect()
    reset_peak()
    base = rss_mb()
    with torch.no_grad():
        old = completion_logprobs(model, pid, pm, cid, cm, record_support=spec)
    count = torch.tensor(float(cm.sum()), dtype=torch.float64)

    def step() -> None:
        out = completion_logprobs(model, pid, pm, cid, cm, need_entropy=need_entropy, support=spec,
                                  old_support=old.get("old_support"))
        batch = PolicyBatch(
            logprobs=out["logprobs"], old_logprobs=old["logprobs"] - 0.01, advantages=adv, mask=cm.float(),
            ref_logprobs=old["logprobs"] if "ref" in objective.needs else None, entropy=out.get("entropy"),
            support_logprobs=out.get("support_logprobs"), old_support_logprobs=out.get("old_support_logprobs"),
            support_mask=out.get("support_mask"), num_tokens=count, num_sequences=torch.tensor(float(args.batch)),
            truncated=torch.zeros(args.batch, dtype=torch.bool))
        if objective.step_needs:
            detached = dataclasses.replace(batch, logprobs=batch.logprobs.detach())
            batch.step_stats = objective.step_statistics(detached, Reducer())
        objective(batch).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"objective": name, "times": times, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}


def table(results: dict[str, list[dict]], args) -> str:
    base = results["ratio_clip"]
    base_s = statistics.median(t for r in base for t in r["times"])
    base_rss = statistics.median(r["peak_rss_mb"] for r in base)
    lines = [f"Tiny Llama, vocabulary 49152, hidden 576, {args.layers} layers; batch {args.batch} x "
             f"{args.completion_len} completion tokens (+{args.prompt_len} prompt); float32, {args.threads} "
             f"thread(s); {args.rounds} rounds x {args.repeats} timed steps per objective.", "",
             "| objective | needs | step s (median) | x ratio_clip | peak RSS MiB | x ratio_clip |",
             "|---|---|---|---|---|---|"]
    from rlclip.objectives import build_objective

    for name, runs in results.items():
        step_s = statistics.median(t for r in runs for t in r["times"])
        peak = statistics.median(r["peak_rss_mb"] for r in runs)
        obj = build_objective(name)
        needs = ", ".join(sorted(set(obj.needs) | {f"step:{n}" for n in obj.step_needs})) or "-"
        lines.append(f"| {name} | {needs} | {step_s:.3f} | {step_s / base_s:.3f} | {peak:.0f} | {peak / base_rss:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--objectives", default=None,
                        help="comma-separated subset (ratio_clip is always measured, as the baseline)")
    parser.add_argument("--output", default=str(ROOT / "eval/results/objectives.md"))
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from rlclip.objectives import available_objectives
    from rlclip.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = available_objectives() if args.objectives is None else args.objectives.split(",")
    results: dict[str, list[dict]] = {n: [] for n in ["ratio_clip", *[n for n in names if n != "ratio_clip"]]}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp, vocab_size=49152, hidden_size=576, num_layers=args.layers)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    data = make_batch(model, args, torch.Generator().manual_seed(1))
    for round_ in range(args.rounds):
        order = list(results) if round_ % 2 == 0 else list(reversed(results))
        for name in order:
            results[name].append(measure(name, model, data, args))
            print(json.dumps(results[name][-1]), file=sys.stderr)
    text = ("# Objectives: step time and peak RSS against ratio_clip\n\nCommand: `python eval/bench/objectives.py "
            + " ".join(sys.argv[1:] if argv is None else argv) + "`\n\n" + table(results, args))
    write_markdown(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
