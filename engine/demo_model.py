"""The built-in demo model: a Llama-architecture model with random (seeded) weights and a
byte-level BPE tokenizer trained offline on text shipped in the repo, with a ChatML template.

Saved with ``save_pretrained``, so it reloads like any local checkpoint. The weights are random:
the output is noise, but every code path (GQA, RoPE, SwiGLU, the chat template, EOS) is real.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# name: (hidden, intermediate, layers, heads, kv heads, context)
SIZES = {
    "tiny": (128, 352, 4, 4, 2, 1024),  # ~3M parameters: the tests
    "small": (256, 704, 6, 8, 4, 2048),  # ~9M
    "base": (768, 2048, 8, 12, 4, 2048),  # ~57M: benchmarks, where model compute dominates
    "1b": (2048, 5632, 22, 32, 4, 2048),  # ~1.0B (TinyLlama's shape): the CUDA benchmark, bf16
}
VOCAB_SIZE = 8192
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    text = resources.files("engine").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_demo_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build the demo model of ``size`` into ``out_dir`` and return the directory."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    hidden, inter, layers, heads, kv_heads, context = SIZES[size]
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
