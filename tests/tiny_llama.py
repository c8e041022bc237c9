"""The tiny word-level tokenizer and random Llama the MAT-Steer tests score, steer and slice."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a is not what who where yes no good bad cat dog sun moon red blue green one two "
         "three four Q: A: ? . , statement hateful answer").split()
HIDDEN = 32


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of WORDS (ids 0, 1, 2: pad, unk, eos)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def tiny_llama(tok: PreTrainedTokenizerFast, layers: int) -> LlamaForCausalLM:
    """A random Llama (hidden HIDDEN, 4 heads / 2 kv heads) over `tok`, seed 0, eval mode."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()
