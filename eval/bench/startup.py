"""Start-up time of the commands that do no training: each in a fresh process, median of N runs.

    python eval/bench/startup.py [--repeats 3] [--output eval/results/startup.md]

Measures ``rlclip --help``, ``rlclip train --help``, ``rlclip objectives``, a config error
(``rlclip train`` with a bad objective setting), ``rlclip eval --suite gsm8k --gold --limit 5``,
and as the peer ``trl --help`` (TRL's CLI), alternating commands so that a slow spell of the
machine hits all of them alike. Also reports whether each command imported torch (it should not:
importing torch takes tens of seconds on a machine whose page cache is reclaimed, see DESIGN.md).
The target (issue 14) is under 3 s for each rlclip command. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = 3.0
PROBE = ("import sys, runpy; sys.argv = {argv!r}; code = 0\n"
         "try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
         "except SystemExit as exc:\n    code = exc.code\n"
         "print('TORCH_IMPORTED=' + str('torch' in sys.modules), file=sys.stderr)\n")
COMMANDS = {
    "rlclip --help": ("rlclip", ["rlclip", "--help"]),
    "rlclip train --help": ("rlclip", ["rlclip", "train", "--help"]),
    "rlclip objectives": ("rlclip", ["rlclip", "objectives"]),
    "config error": ("rlclip", ["rlclip", "train", "--config", "recipes/smoke/tiny.yaml", "--objective.eps_low", "-1"]),
    "rlclip eval --gold": ("rlclip", ["rlclip", "eval", "--suite", "gsm8k", "--gold", "--limit", "5", "--no-progress"]),
    "trl --help (peer)": ("trl.cli", ["trl", "--help"]),
}


def run_once(module: str, argv: list[str]) -> tuple[float, bool]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, module=module)], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, "TORCH_IMPORTED=True" in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    torch_used: dict[str, bool] = {}
    for _ in range(args.repeats):
        for name, (module, argv) in COMMANDS.items():
            seconds, used = run_once(module, argv)
            times[name].append(seconds)
            torch_used[name] = used
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = ["| command | median s | runs (s) | imports torch | under 3 s |", "|---|---|---|---|---|"]
    for name, values in times.items():
        ok = "peer" if "peer" in name else ("yes" if medians[name] < TARGET_S else "no")
        lines.append(f"| `{name}` | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{'yes' if torch_used[name] else 'no'} | {ok} |")
    text = "\n".join(lines)
    result = {"median_s": medians, "imports_torch": torch_used,
              "all_under_3s": all(v < TARGET_S for k, v in medians.items() if "peer" not in k)}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(f"# Start-up time\n\n`python eval/bench/startup.py --repeats {args.repeats}`\n\n"
                                     f"{text}\n\n```json\n{json.dumps(result)}\n```\n")
    print(text)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
