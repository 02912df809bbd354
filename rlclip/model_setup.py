"""The models and optimizers a run trains with, built from its config (the trainer's set-up stage).

- :func:`prepare_policy`: activation checkpointing, LoRA adapters and ``torch.compile`` on the loaded policy;
- :func:`reference_model`: the frozen copy of the initial policy that KL terms compare against (compiled too);
- :func:`critic_and_optimizer`: PPO mode's value model with its own optimizer;
- :func:`build_optimizer`: the policy's optimizer.

Sharding (FSDP) and wrapping (DDP, DeepSpeed) are the layout's (rlclip/parallel.py); these functions only
build what the layout then places.
"""

from __future__ import annotations

from typing import Any

import torch

from rlclip.compiling import compile_policy
from rlclip.critic import load_critic
from rlclip.modeling import GRADIENT_CHECKPOINTING_KWARGS, load_model


def prepare_policy(model: torch.nn.Module, config: Any, sparse_embedding: bool = True) -> torch.nn.Module:
    """Checkpointing per ``config.model.gradient_checkpointing``, then LoRA per ``config.lora`` (a PEFT model),
    then the decoder layers compiled in place per ``config.model.compile`` (rlclip/compiling.py).

    ``sparse_embedding``: a tied input embedding sends its gradient sparsely
    (:func:`sparse_tied_embedding_gradient`); only for one process with plain parameters, since DDP then
    expects a sparse gradient where autograd delivers the dense sum, and FSDP and DeepSpeed hold shards."""
    if sparse_embedding and not config.lora.enabled:
        sparse_tied_embedding_gradient(model)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
        model.config.use_cache = False
    if not config.lora.enabled:
        return compile_policy(model, config.model.compile)
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    targets: str | list[str] = list(lora.target_modules)
    layers = None
    if lora.last_layers:
        total = model.config.num_hidden_layers
        layers = list(range(max(0, total - lora.last_layers), total))
        if targets == ["all-linear"]:  # peft needs explicit names with layers_to_transform
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    elif targets == ["all-linear"]:
        targets = "all-linear"
    adapters = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          layers_to_transform=layers, task_type="CAUSAL_LM")
    return compile_policy(get_peft_model(model, adapters), config.model.compile)


def sparse_tied_embedding_gradient(model: torch.nn.Module) -> bool:
    """A tied input embedding sends only its looked-up rows back; True when it was switched on.

    With ``tie_word_embeddings`` the output layer's gradient is already dense ``[V, H]``; the embedding's
    dense backward would make a second zero-filled ``[V, H]`` (113 MB for SmolLM2's 49k x 576), scatter the
    ``B x T`` used rows into it and add it. Sparse, it is ``B x T`` rows that autograd adds into the dense
    one, so the gradient reaching the optimizer is still one dense tensor, equal up to the order of
    floating-point additions (tests/test_optim_in_backward.py). An untied embedding is left dense: AdamW
    takes no sparse gradient."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, torch.nn.Embedding) and head is not None and embedding.weight is head.weight
    if tied and embedding.weight.requires_grad:
        embedding.sparse = True
    return bool(tied and embedding.sparse)


def reference_model(config: Any, base_path: str, layout: Any) -> torch.nn.Module:
    """A frozen copy of the initial policy (loaded again from ``base_path``), placed by the layout.

    Its forwards are no-grad passes without a KV cache, so ``model.compile`` train or all compiles it (its
    layers share the policy's compiled function; frozen parameters add one graph)."""
    cfg = config.model
    ref = load_model(base_path, cfg.dtype, cfg.gguf_file, cfg.trust_remote_code, cfg.attn_implementation)
    ref.requires_grad_(False).eval()
    return layout.reference(compile_policy(ref, cfg.compile))


def critic_and_optimizer(config: Any, base_path: str,
                         accelerator: Any) -> tuple[torch.nn.Module | None, torch.optim.Optimizer | None]:
    """PPO mode (``advantage.name: gae``): the value model and its own AdamW, prepared; (None, None) otherwise."""
    if config.advantage.name != "gae":
        return None, None
    cfg = config.critic
    critic = load_critic(cfg.name_or_path or base_path, config.model.dtype, config.model.trust_remote_code,
                         cfg.lora_r)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return accelerator.prepare(critic, optimizer)


def build_optimizer(model: torch.nn.Module, train: Any, fused_allowed: bool) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters: SGD, or AdamW with torch's fused kernel where allowed.

    The fused kernel is one pass per step instead of a loop of small ops per tensor (about 4 optimizer passes
    over the model fewer); it takes plain floating-point tensors on CPU or CUDA only, so DTensor shards (FSDP)
    and DeepSpeed's flat partitions (``fused_allowed`` False) keep the default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.learning_rate)
    fused = fused_allowed and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
                                  and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                             betas=(train.adam_beta1, train.adam_beta2), fused=fused or None)
