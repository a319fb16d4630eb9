"""Offline models: a character-level tokenizer and tiny Llama models built locally, never downloaded.

transformers and tokenizers are imported inside the functions, so ``import align`` needs torch alone.
"""

from align.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm, build_tiny_classifier

__all__ = ["TinyModelConfig", "build_char_tokenizer", "build_tiny_causal_lm", "build_tiny_classifier"]
