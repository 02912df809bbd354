"""A run's records on disk and in the trackers: ``config.yaml`` at the start, one ``metrics.jsonl`` line per step.

Only the main process writes files; every process calls in, because
accelerate's trackers are set up and fed collectively.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlclip.config import flat_scalars, to_yaml

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rlclip.config import TrainConfig


class RunLog:
    """Writes the resolved config and the per-step metrics of one run under ``output_dir``."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator, self.output_dir = accelerator, output_dir

    def start(self, config: TrainConfig) -> None:
        """``config.yaml`` (the resolved recipe) and the trackers' hyper-parameters."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(config))
        if config.logging.report_to != "none":
            self.accelerator.init_trackers(config.logging.run_name, config=flat_scalars(config))

    def write(self, metrics: dict[str, Any], step: int) -> None:
        """Send to the trackers and append to metrics.jsonl (non-finite floats as null, so the line stays JSON).

        With ``model.compile`` on, a step during which torch compiled also gets ``time/compile_s``: the
        seconds spent compiling since the previous line (part of that step's ``time/step_s``)."""
        from rlclip.compiling import compile_metrics

        metrics = {**metrics, **compile_metrics()}
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if self.accelerator.is_main_process:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(clean) + "\n")
