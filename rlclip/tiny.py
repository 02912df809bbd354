"""A tiny random Llama-style model with a locally made tokenizer (no download).

Used by the smoke recipe, the tests and anyone who wants to try rlclip
without network access: ``rlclip tiny-model DIR`` or
``model: {name_or_path: tiny}`` in a recipe.
"""

from __future__ import annotations

import os
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when the tiny model or tokenizer changes (cached builds are keyed on it).
TINY_VERSION = 1
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
# Printable ASCII one character per token: digits and operators are single
# tokens, which makes arithmetic tasks legible for a tiny model.
CHARACTERS = list(string.digits + string.ascii_letters + string.punctuation + " \n")

# ChatML, as used by Qwen2.5 and SmolLM2, so prompts look like the real thing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with ChatML special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="?",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, vocab_size: int | None = None) -> str:
    """Build and save a tiny random Llama model and its tokenizer to ``out_dir``.

    ``vocab_size`` larger than the tokenizer pads the embedding (used by
    benchmarks that need a realistic vocabulary). Returns ``out_dir``.
    """
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
