"""Small Hugging Face transformers models (random weights, built from small configs, nothing
downloaded) for the torch.export front end's tests."""

from __future__ import annotations

import torch

VOCAB = 100
TOKENS = 16


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model in eval mode, example input) for ``name`` in :data:`NAMES`."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if name == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(max_position_embeddings=64, **common))
    elif name == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(cfg)
    elif name == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        model = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **common))
    elif name == "mixtral":  # mixture of experts: a router's top-2 of 4 experts, grouped expert matmuls
        cfg = T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, use_cache=False, **common)
        model = T.MixtralForCausalLM(cfg)
    elif name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_labels=5, **{k: v for k, v in common.items() if k != "vocab_size"})
        model = T.ViTForImageClassification(cfg)
        return model.eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(name)
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(seed))
    return model.eval(), ids


NAMES = ("bert", "gpt2", "llama", "vit")  # the default run's four; build() also knows "mixtral"


def main_output(out) -> torch.Tensor:
    """The logits of a ModelOutput (or a plain dict of one)."""
    return out["logits"]
