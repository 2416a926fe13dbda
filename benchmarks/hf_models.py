"""Pretrained-model folders for model=hf, made offline the way a user's come: `save_pretrained` of a
transformers model (a GPT-2, BERT or ViT built from its config, 2 layers unless told) beside its tokenizer
or image processor. Never a download. The tests' tiny models and vs_hf_trainer.py's are made here."""

from pathlib import Path

WORDS = (
    "the quick brown fox jumps over the lazy dog while a good movie makes a happy day and a bad film "
    "makes a sad night of rain"
).split()


def _byte_bpe(texts: list[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tiny_gpt2(
    folder: Path, texts: list[str] | None = None, pretrain_steps: int = 0, n_positions: int = 128, **sizes
) -> Path:
    """A GPT-2-class causal LM with a byte-level BPE tokenizer (end of text: <|endoftext|>), trained on
    `texts` for `pretrain_steps` steps."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = texts or [" ".join(WORDS)] * 20
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(texts, sizes.pop("tokenizer_size", 320), ["<|endoftext|>"]),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    config = GPT2Config(
        vocab_size=sizes.get("vocab_size", len(tokenizer)),  # fewer: a model too small for its tokenizer
        n_positions=n_positions,
        n_embd=sizes.get("n_embd", 32),
        n_layer=sizes.get("n_layer", 2),
        n_head=sizes.get("n_head", 2),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if pretrain_steps:
        _pretrain(model, tokenizer, texts, pretrain_steps)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pretrain(model, tokenizer, texts: list[str], steps: int) -> None:
    """A few hundred steps of next-token training on `texts`, so that the model is pretrained the way
    a real one is (what LoRA then adapts), in a second or two."""
    import torch

    ids = torch.tensor([t for text in texts for t in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 17, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 17] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def tiny_bert(folder: Path, texts: list[str] | None = None, vocab_size: int = 200, **sizes) -> Path:
    """A BERT-class encoder (saved as a masked LM, as pretrained BERTs are) with a WordPiece tokenizer
    trained on `texts`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(
        texts or [" ".join(WORDS)] * 10,
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False),
    )
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.get("hidden_size", 32),
        num_hidden_layers=sizes.get("num_hidden_layers", 2),
        num_attention_heads=sizes.get("num_attention_heads", 2),
        intermediate_size=2 * sizes.get("hidden_size", 32),
        max_position_embeddings=sizes.get("max_position_embeddings", 64),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vit(folder: Path, image_size: int = 16) -> Path:
    """A ViT image classifier (its head for 1,000 classes, as ImageNet's) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1000,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder
