"""A character-level tokenizer and tiny Llama models, built offline in Hugging Face format.

Used by tests, the quickstart and benchmarks: nothing here reaches a model hub. The tokenizer is a
``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model with one token per character, plus ``<pad>``,
``<bos>`` and ``<eos>``, and a minimal chat template; it round-trips through ``save_pretrained`` /
``AutoTokenizer.from_pretrained``. (Qwen2 configs are avoided: AutoTokenizer would swap in Qwen2's pre-tokenizer.)
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

DEFAULT_ALPHABET = string.digits + string.ascii_letters + " +-*/=()<>[]{}.,:;!?'\"\n_#%&|^~@$\\"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Size of a tiny Llama: the defaults give about 1M parameters with a 100-token vocabulary."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 256
    seed: int = 0


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ids 0..2 are <pad>, <bos>, <eos>, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<pad>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama_config(vocab_size: int, config: TinyModelConfig, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **extra,
    )


def build_tiny_causal_lm(vocab_size: int, config: TinyModelConfig | None = None) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (seeded)."""
    import torch
    from transformers import LlamaForCausalLM

    config = config or TinyModelConfig()
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(_llama_config(vocab_size, config))


def build_tiny_classifier(vocab_size: int, num_labels: int = 1, config: TinyModelConfig | None = None) -> Any:
    """A randomly initialised ``LlamaForSequenceClassification`` (seeded), e.g. a stand-in reward model."""
    import torch
    from transformers import LlamaForSequenceClassification

    config = config or TinyModelConfig()
    torch.manual_seed(config.seed)
    return LlamaForSequenceClassification(_llama_config(vocab_size, config, num_labels=num_labels))
