"""Text: tokenizers (byte-level built in, BPE through Hugging Face `tokenizers`, the `text` extra).
Generation with a key/value cache is `trainer.generate`."""
