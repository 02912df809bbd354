"""The evaluation engine: load a suite, sample completions (or take the gold solutions),
grade them with :func:`rlclip.rewards.grading.grade`, and report pass@1, pass@k, maj@k.

Python use::

    from rlclip.eval.engine import EvalConfig, run_eval
    summary = run_eval(EvalConfig(suite="gsm8k", gold=True, limit=50))
    summary["accuracy"], summary["extraction_failures"]
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from rlclip.data.errors import DataError
from rlclip.data.suites import SUITES, get_suite
from rlclip.eval import EvalError
from rlclip.eval.generation import Generated
from rlclip.eval.metrics import breakdown, default_ks, mean_metrics, problem_metrics
from rlclip.rewards.grading import MATH_SUITES, answer_key, extract_answer, grade
from rlclip.rewards.verify_pool import get_pool

__all__ = ["EvalConfig", "EvalError", "run_eval", "format_summary"]
BACKENDS = ("hf", "vllm")
MAX_NEW_TOKENS = {"math500": 512, "math": 512}
"""Per-suite generation budget; the other suites (GSM8K, SVAMP, ASDiv: short arithmetic) get 256."""
DEFAULT_MAX_NEW_TOKENS = 256
DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class EvalConfig:
    """Everything ``rlclip eval`` can be told (one field per flag)."""

    suite: str
    data_file: str | None = None
    model: str | None = None
    gold: bool = False
    num_samples: int = 1
    limit: int | None = None
    split: str | None = None
    instruction: str | None = None
    output_json: str | None = None
    output_jsonl: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: the suite's budget (MAX_NEW_TOKENS, else 256)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "hf"
    dtype: str = "float32"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    progress: bool = True


def validate(config: EvalConfig) -> None:
    """Raise EvalError (naming the problem and the fix) for unusable settings."""
    if config.suite not in SUITES:
        raise EvalError(f"unknown suite {config.suite!r}; choose one of {', '.join(SUITES)}")
    if config.model and config.gold:
        raise EvalError("--model and --gold exclude each other; pass one of them")
    if not config.model and not config.gold:
        raise EvalError("nothing to evaluate; pass --model PATH (a model or LoRA adapter) or --gold")
    _check_numbers(config)
    if config.model and config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        # before the model is looked at: installing vllm is the first fix either way
        raise EvalError("--backend vllm needs the vllm package (pip install vllm); or use --backend hf")
    if config.data_file and not os.path.exists(config.data_file):
        default = get_suite(config.suite).default_source()
        raise EvalError(
            f"--data-file {config.data_file}: no such file; pass an existing file or omit it (default: {default})"
        )
    if config.backend not in BACKENDS:
        raise EvalError(f"unknown --backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if config.dtype not in DTYPES:
        raise EvalError(f"unknown --dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if config.model and not os.path.exists(config.model) and not _HUB_ID_RE.match(config.model):
        from rlclip.modeling import SMOLLM2_GGUF, TINY  # torch and transformers: only when a model is named

        if config.model not in (TINY, SMOLLM2_GGUF):
            raise EvalError(f"--model {config.model}: no such directory; pass a model/adapter directory or hub name")


def _check_numbers(config: EvalConfig) -> None:
    checks = [
        (config.num_samples >= 1, f"--num-samples must be >= 1, got {config.num_samples}"),
        (config.limit is None or config.limit >= 1, f"--limit must be >= 1, got {config.limit}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.max_new_tokens is None or config.max_new_tokens >= 1,
         f"--max-new-tokens must be >= 1, got {config.max_new_tokens}"),
        (config.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {config.temperature}"),
        (0 < config.top_p <= 1, f"--top-p must be in (0, 1], got {config.top_p}"),
    ]
    for ok, message in checks:
        if not ok:
            raise EvalError(message)


def load_records(config: EvalConfig) -> tuple[list[dict[str, Any]], str]:
    """The suite's records (limited) and where they came from."""
    suite = get_suite(config.suite)
    source = config.data_file or suite.default_source()
    try:
        records = suite.loader(
            source, split=config.split or suite.split, instruction=config.instruction, limit=config.limit
        )
    except DataError as exc:
        raise EvalError(str(exc)) from None
    if not records:
        raise EvalError(f"{source} holds no problems; pass a file with records")
    return records, source


def produce_completions(config: EvalConfig, records: list[dict[str, Any]]) -> Generated:
    """k completions per problem (gold mode: the reference solution) and their token counts."""
    if config.gold:
        return Generated([[record["solution"]] for record in records], [[0] for _ in records])
    from rlclip.eval.generation import GenerationSettings, generate_hf, generate_vllm  # torch, lazily

    settings = GenerationSettings(
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        dtype=config.dtype,
        gguf_file=config.gguf_file,
        trust_remote_code=config.trust_remote_code,
        progress=config.progress,
    )
    backend = generate_vllm if config.backend == "vllm" else generate_hf
    try:
        return backend(str(config.model), [record["prompt"] for record in records], settings)
    except EvalError:
        raise
    except (OSError, ValueError) as exc:  # unloadable model/adapter, bad GGUF file...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalError(f"cannot evaluate --model {config.model}: {first}") from None


def _grade_one(completion: str, gold: str, suite: str) -> dict[str, Any]:
    return {
        "extracted": extract_answer(completion, suite),
        "key": answer_key(completion, suite),
        "correct": grade(completion, gold, suite),
    }


def grade_completions(suite: str, records: list[dict[str, Any]], completions: list[list[str]]) -> list[list[dict]]:
    """Extracted answer, vote key and correctness of every sample (MATH: graded in parallel)."""
    jobs = [(i, j, text) for i, samples in enumerate(completions) for j, text in enumerate(samples)]
    golds = [str(record["answer"]) for record in records]
    if suite in MATH_SUITES and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=get_pool().max_workers) as pool:
            graded = list(pool.map(lambda job: _grade_one(job[2], golds[job[0]], suite), jobs))
    else:
        graded = [_grade_one(text, golds[i], suite) for i, _, text in jobs]
    results: list[list[dict]] = [[] for _ in records]
    for (i, _, _), result in zip(jobs, graded):
        results[i].append(result)
    return results


def summarize(
    config: EvalConfig,
    records: list[dict[str, Any]],
    results: list[list[dict]],
    source: str,
    timing: dict[str, float],
) -> dict[str, Any]:
    """The summary: accuracy (mean pass@1), n, extraction failures, pass@k, maj@k, breakdowns."""
    k = len(results[0])
    ks = default_ks(k)
    rows = [problem_metrics([s["correct"] for s in samples], [s["key"] for s in samples], ks) for samples in results]
    means = mean_metrics(rows)
    failures = sum(s["extracted"] is None for samples in results for s in samples)
    return {
        "suite": config.suite,
        "source": source,
        "model": config.model,
        "gold": config.gold,
        "n": len(records),
        "num_samples": k,
        "accuracy": means["pass@1"],
        "pass@k": {str(key): means[f"pass@{key}"] for key in ks},
        "maj@k": {str(k): means[f"maj@{k}"]},
        **{f"pass@{key}": means[f"pass@{key}"] for key in ks},
        f"maj@{k}": means[f"maj@{k}"],
        "extraction_failures": failures,
        "extraction_failure_rate": failures / (len(records) * k),
        "breakdown": breakdown(rows, records, get_suite(config.suite).breakdown),
        "timing": timing,
        "settings": {key: value for key, value in asdict(config).items() if key not in ("progress",)},
    }


_RECORD_FIELDS_SKIPPED = ("prompt", "solution", "answer", "suite")


def sample_rows(
    records: list[dict[str, Any]], completions: list[list[str]], tokens: list[list[int]], results: list[list[dict]]
) -> list[dict[str, Any]]:
    """One JSON-ready row per sample: ids/metadata, gold, completion, extraction, correctness."""
    rows = []
    for index, (record, samples) in enumerate(zip(records, results)):
        metadata = {key: value for key, value in record.items() if key not in _RECORD_FIELDS_SKIPPED}
        for j, result in enumerate(samples):
            rows.append(
                {
                    "index": index,
                    "sample": j,
                    "suite": record["suite"],
                    **metadata,
                    "answer": record["answer"],
                    "extracted": result["extracted"],
                    "correct": result["correct"],
                    "num_tokens": tokens[index][j],
                    "completion": completions[index][j],
                }
            )
    return rows


def _write(path: str, text: str) -> None:
    try:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise EvalError(f"cannot write {path} ({exc.strerror}); pass a writable path") from None


def samples_path(config: EvalConfig) -> str | None:
    """``--output-jsonl``, else ``<output-json stem>.samples.jsonl`` when ``--output-json`` is set."""
    if config.output_jsonl:
        return config.output_jsonl
    if config.output_json:
        stem = config.output_json[:-5] if config.output_json.endswith(".json") else config.output_json
        return stem + ".samples.jsonl"
    return None


def write_outputs(config: EvalConfig, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Summary JSON and per-sample JSONL, where asked for."""
    if config.output_json:
        _write(config.output_json, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    path = samples_path(config)
    if path:
        _write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _percent(value: float) -> str:
    return f"{100 * value:6.2f}%"


def format_summary(summary: dict[str, Any]) -> str:
    """A console table of the summary (and its breakdowns)."""
    what = "gold self-check" if summary["gold"] else f"model {summary['model']}"
    k, timing = summary["num_samples"], summary["timing"]
    lines = [
        f"suite {summary['suite']}  ({what}; {summary['source']})",
        f"  {'problems':<22}{summary['n']:>8}",
        f"  {'samples per problem':<22}{k:>8}",
        f"  {'accuracy (pass@1)':<22}{_percent(summary['accuracy']):>8}",
    ]
    lines += [f"  {'pass@' + key:<22}{_percent(v):>8}" for key, v in summary["pass@k"].items() if key != "1"]
    if k > 1:
        lines.append(f"  {f'maj@{k}':<22}{_percent(summary[f'maj@{k}']):>8}")
    failures = summary["extraction_failures"]
    lines.append(f"  {'extraction failures':<22}{failures:>8}  ({_percent(summary['extraction_failure_rate']).strip()})")
    lines.append(
        "  time: " + ", ".join(f"{name[:-2]} {value:.1f}s" for name, value in timing.items() if name.endswith("_s"))
    )
    for field, groups in summary["breakdown"].items():
        lines.append(f"  by {field}:")
        lines += [f"    {name:<26}{g['n']:>6}  {_percent(g['pass@1']):>8}" for name, g in groups.items()]
    return "\n".join(lines)


def suite_max_new_tokens(suite: str) -> int:
    """The default generation budget of ``suite``: 512 for MATH-500 and MATH, 256 otherwise."""
    return MAX_NEW_TOKENS.get(suite, DEFAULT_MAX_NEW_TOKENS)


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Validate, load, generate (or take gold solutions), grade, summarize and write outputs."""
    validate(config)
    if config.max_new_tokens is None:
        config.max_new_tokens = suite_max_new_tokens(config.suite)
    if config.gold and config.num_samples != 1:
        print("rlclip eval: --gold grades one reference solution per problem; ignoring --num-samples", file=sys.stderr)
        config.num_samples = 1
    start = time.perf_counter()
    records, source = load_records(config)
    loaded = time.perf_counter()
    output = produce_completions(config, records)
    generated = time.perf_counter()
    results = grade_completions(config.suite, records, output.completions)
    graded = time.perf_counter()
    total_tokens = sum(sum(row) for row in output.num_tokens)
    generate_s = generated - loaded - output.load_model_s
    timing = {
        "load_data_s": loaded - start,
        "load_model_s": output.load_model_s,
        "generate_s": generate_s,
        "grade_s": graded - generated,
        "total_s": graded - start,
        "generated_tokens": total_tokens,
        "tokens_per_second": total_tokens / generate_s if total_tokens and generate_s > 0 else 0.0,
    }
    summary = summarize(config, records, results, source, timing)
    write_outputs(config, summary, sample_rows(records, output.completions, output.num_tokens, results))
    return summary
