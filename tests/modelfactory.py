"""Tiny real Hugging Face model families built in code, for engine tests that need no training.

A family is a base plus K sources = base + a small random task vector, saved with
save_pretrained (safetensors), in Llama, Qwen2 or GPT-2 naming.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str, *, layers: int = 4, vocab: int = 48, hidden: int = 32):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    raise ValueError(arch)


def make_family(root: Path, *, arch: str = "llama", k: int = 3, seed: int = 0, scale: float = 0.02,
                layers: int = 4, vocab: int = 48, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """Write root/base and root/s0..s{k-1}; return their paths."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(seed)
    config = tiny_config(arch, layers=layers, vocab=vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    base_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    root = Path(root)
    model.save_pretrained(root / "base")
    paths = []
    for i in range(k):
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if param.is_floating_point():
                    noise = torch.randn(param.shape, generator=gen) * scale
                    param.copy_((base_state[name].float() + noise).to(param.dtype))
        model.save_pretrained(root / f"s{i}")
        paths.append(root / f"s{i}")
    return root / "base", paths
