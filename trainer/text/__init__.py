"""Text: tokenizers (byte-level built in, BPE through Hugging Face `tokenizers`, the `text` extra) and
generation with a key/value cache."""
