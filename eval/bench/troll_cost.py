"""Cost of a TROLL training step against ratio_clip at a 49k vocabulary (not a test).

One step = the update pass of the chunked policy (forward + backward through
``completion_logprobs``) plus the objective, on a tiny Llama whose output
head dominates the compute as in SmolLM2-135M (vocabulary 49152, hidden 576).
Each objective runs in its own subprocess, so each gets its own peak RSS
(``resource.getrusage``). The behaviour pass (no grad; with
``record_support`` for TROLL) is timed separately.

    python eval/bench/troll_cost.py                # writes eval/results/troll_cost.md
    python eval/bench/troll_cost.py --repeats 3 --rounds 4 --threads 1,2

Two regimes, set by scaling the final norm (the logit scale) of the random
model and by the relative weight noise added between the behaviour pass and
the update (the policy moved since the rollout):

- ``peaked``: entropy about 0.9 nats, top-1 probability about 0.7, about a
  quarter of the tokens projected (closest to a trained LLM this random model gets);
- ``flat``: entropy about 9 nats, every top set hits the top_k cap (the
  largest union support, the worst case for TROLL's support code), almost
  every token projected.

Machines shared with other jobs make single timings noisy: the objectives
alternate over ``--rounds`` rounds of subprocesses and the table gives the
median and the minimum over all timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REGIMES = {"peaked": (24.0, 0.01), "flat": (4.0, 0.05)}  # (final-norm scale, relative weight noise)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlclip.objectives import PolicyBatch, build_objective
    from rlclip.policy import completion_logprobs

    torch.manual_seed(0)
    torch.set_num_threads(int(args.threads))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    norm_scale, noise = REGIMES[args.regime]
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(norm_scale)
    model.train()
    obj = build_objective(args.objective)
    spec = getattr(obj, "support_spec", None)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    pid = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    cid = torch.randint(3, vocab, (args.batch, args.completion_len), generator=g)
    pm, cm = torch.ones_like(pid), torch.ones_like(cid)
    adv = torch.randn(args.batch, 1, generator=g).expand(-1, args.completion_len).contiguous()
    baseline = rss_mb()

    behaviour_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            rec = completion_logprobs(model, pid, pm, cid, cm, record_support=spec)
        behaviour_times.append(time.perf_counter() - start)
    with torch.no_grad():  # the policy moved since the rollout: some tokens leave the trust region
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())

    def step() -> dict:
        out = completion_logprobs(model, pid, pm, cid, cm, support=spec, old_support=rec.get("old_support"))
        batch = PolicyBatch(logprobs=out["logprobs"], old_logprobs=rec["logprobs"], advantages=adv,
                            mask=cm.float(), support_logprobs=out.get("support_logprobs"),
                            old_support_logprobs=out.get("old_support_logprobs"),
                            support_mask=out.get("support_mask"))
        result = obj(batch)
        result.loss.backward()
        model.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in result.metrics.items()}

    metrics = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"objective": args.objective, "regime": args.regime, "step_times": times,
            "behaviour_times": behaviour_times, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "metrics": metrics}


def run_child(args: argparse.Namespace, objective: str, regime: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--objective", objective, "--regime", regime,
           "--model-dir", args.model_dir, "--repeats", str(args.repeats), "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(runs: list[dict]) -> dict:
    """One objective x regime over all rounds: step times pooled, the largest peak RSS."""
    steps = [t for r in runs for t in r["step_times"]]
    behaviour = [t for r in runs for t in r["behaviour_times"]]
    worst = max(runs, key=lambda r: r["peak_rss_mb"])
    return {"objective": runs[0]["objective"], "regime": runs[0]["regime"], "step_s": statistics.median(steps),
            "step_min_s": min(steps), "behaviour_s": statistics.median(behaviour),
            "behaviour_min_s": min(behaviour), "peak_rss_mb": worst["peak_rss_mb"],
            "baseline_rss_mb": worst["baseline_rss_mb"], "metrics": runs[0]["metrics"], "n_steps": len(steps)}


def table(results: list[dict], args: argparse.Namespace, threads: int) -> str:
    n_steps = results[0]["n_steps"]
    lines = [
        f"Tiny Llama: vocabulary 49152, hidden 576, {args.layers} layers (the output head is most of the "
        f"compute), batch {args.batch} x {args.completion_len} completion tokens (+{args.prompt_len} prompt), "
        f"float32, {threads} CPU thread(s), chunk 1024 positions. Step = update pass forward + backward + "
        f"objective. {args.rounds} alternating rounds x {args.repeats} steps = {n_steps} timed steps per row "
        "(median, and min in brackets); one subprocess per run, peak RSS of the whole process ('above base' = "
        "peak minus the RSS after loading the model and building the batch).",
        "",
        "| regime | objective | step s: median (min) | x ratio_clip: median (min) | peak RSS MB | x ratio_clip "
        "| above base MB | behaviour pass s: median (min) | projected | support size |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        rows = {r["objective"]: r for r in results if r["regime"] == regime}
        base = rows["ratio_clip"]
        for name in ("ratio_clip", "troll"):
            r, m = rows[name], rows[name]["metrics"]
            lines.append(
                f"| {regime} | {name} | {r['step_s']:.3f} ({r['step_min_s']:.3f}) "
                f"| {r['step_s'] / base['step_s']:.3f} ({r['step_min_s'] / base['step_min_s']:.3f}) "
                f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.3f} "
                f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
                f"| {r['behaviour_s']:.3f} ({r['behaviour_min_s']:.3f}) "
                f"| {m.get('projected_frac', float('nan')):.2f} | {m.get('support_size', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objective", default="troll")
    parser.add_argument("--regime", default="peaked", choices=sorted(REGIMES))
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--threads", default="1",
                        help="torch threads, or a comma list (one table each); 1 by default: on a shared "
                             "machine, multi-threaded small ops wait for busy cores")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds per objective")
    parser.add_argument("--output", default=str(ROOT / "eval/results/troll_cost.md"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from rlclip.tiny import build_tiny_model

    text = "# TROLL cost vs ratio_clip\n\nCommand: `python eval/bench/troll_cost.py " + " ".join(sys.argv[1:]) + "`\n"
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model_dir:
            args.model_dir = build_tiny_model(tmp, vocab_size=49152, hidden_size=576, num_layers=args.layers)
        for threads in (int(t) for t in str(args.threads).split(",")):
            runs = []
            for r in range(args.rounds):
                for regime in REGIMES:
                    order = ("ratio_clip", "troll") if r % 2 == 0 else ("troll", "ratio_clip")
                    for objective in order:
                        runs.append(run_child(args, objective, regime, threads))
                        print(json.dumps({k: v for k, v in runs[-1].items() if k != "metrics"}), file=sys.stderr)
            results = [merge([x for x in runs if (x["objective"], x["regime"]) == key])
                       for key in dict.fromkeys((x["objective"], x["regime"]) for x in runs)]
            text += "\n" + table(results, args, threads)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
