"""Small random-weight models and plain `generate()` as a reference, for tests and benchmarks of the backend.

No weights come from a hub: the models are built from configs, so tests run offline and issue #7's
benchmarks can use the same architectures at full size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import CodeGenConfig, CodeGenForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# The sizes of our tiny Llama-style decoders (grouped-query attention: 4 heads share 2 key/value heads).
TINY_DECODER_SIZES: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_llama(seed: int = 0) -> PreTrainedModel:
    """A two-layer Llama (SmolLM2's architecture: grouped-query attention, rotary), random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_DECODER_SIZES, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_codegen(seed: int = 1) -> PreTrainedModel:
    """A two-layer CodeGen (FauxPilot's architecture), random weights."""
    torch.manual_seed(seed)
    config = CodeGenConfig(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256
    )
    return CodeGenForCausalLM(config).eval()


def hf_greedy(model: PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Plain `generate()`, greedy, on a left-padded batch, never stopping early; the generated ids per row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return [row[width:].tolist() for row in out]
