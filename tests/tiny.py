"""Random-init tiny models with a byte-level tokenizer, written to a folder; no downloads.

``make_tiny_llama`` is the Llama every fast test uses. ``make_tiny`` builds the other
architectures of the paper's grid at the same scale, with what sets each apart: Qwen2's biased
q/k/v projections and tied embeddings; Phi's ``fc1``/``fc2``/``dense`` layers, partial rotary
embedding and biased LayerNorm.
"""

from __future__ import annotations

from pathlib import Path

# Hidden 96 is not a multiple of 64: group size 64 exercises the non-divisible path.
HIDDEN, INTERMEDIATE, LAYERS = 96, 128, 2
ARCHITECTURES = ("llama", "qwen2", "phi")


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {ch: i + 3 for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="</s>"), len(vocab)


def tiny_config(arch: str, vocab_size: int, hidden: int = HIDDEN):
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    shared = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(**shared, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v carry biases in Qwen2's attention; embeddings tied as in Qwen2.5-0.5B
        return Qwen2Config(**shared, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "phi":  # fc1/fc2 MLP, `dense` output projection, half-rotary, LayerNorm with bias
        return PhiConfig(**shared, num_key_value_heads=4, partial_rotary_factor=0.5,
                         tie_word_embeddings=False)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def make_tiny(directory: Path, arch: str = "llama", seed: int = 0, hidden: int = HIDDEN) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, vocab_size = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, hidden))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_llama(directory: Path, seed: int = 0) -> Path:
    return make_tiny(directory, "llama", seed)
