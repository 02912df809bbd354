"""The cost of trust/... telemetry: its share of the optimizer-step time, measured inside one run.

    python eval/bench/telemetry_cost.py [--steps 6] [--recipe recipes/smoke/tiny.yaml]

Trains the recipe with telemetry on, timing ``TrustTelemetry.observe`` / ``end_step``
(the only work it adds) and every ``optimizer_step`` and rollout; prints the
share of the step (rollout included, as ``time/step_s``) and of the update
alone. Issue 13's budget: at most 3% of step time at the tiny recipe. The
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed(owner, name: str, bucket: list[float]) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/smoke/tiny.yaml"))
    args = parser.parse_args()
    from rlclip.config import load_config
    from rlclip.telemetry import TrustTelemetry
    from rlclip.trainer import Trainer

    telemetry, updates, rollouts = [], [], []
    timed(TrustTelemetry, "observe", telemetry)
    timed(TrustTelemetry, "end_step", telemetry)
    timed(Trainer, "optimizer_step", updates)
    timed(Trainer, "rollout", rollouts)
    out = tempfile.mkdtemp()
    config = load_config(args.recipe, [f"output_dir={out}", f"max_steps={args.steps}", "logging.progress_bar=false"])
    Trainer(config).train()
    total = sum(updates) + sum(rollouts)
    result = {"steps": len(updates), "telemetry_s": sum(telemetry), "update_s": sum(updates),
              "step_s": total, "share_of_step": sum(telemetry) / total,
              "share_of_update": sum(telemetry) / sum(updates)}
    print(f"telemetry {result['telemetry_s']:.3f} s of {total:.1f} s over {len(updates)} steps: "
          f"{100 * result['share_of_step']:.2f}% of the step, {100 * result['share_of_update']:.2f}% of the update")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
