"""A tiny random Llama and a BPE tokenizer trained in seconds on synthetic essays: a ``--model`` directory for the
CPU demo of eval_needle.py / eval_ppl.py and for the tests, with no download. Its scores are those of a random
model (needle accuracy 0, perplexity about the vocabulary size): it shows the pipeline, not a result.

    python -m easy_context.eval.tiny output/tiny-llama
"""
from __future__ import annotations

import sys


def _byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level pre-tokenizer maps each byte 0..255 to (its ``bytes_to_unicode``):
    printable Latin-1 bytes stand for themselves, the others for ``chr(256 + n)`` in byte order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return chars


def make_tokenizer(kind: str = "bytelevel", *, vocab_size: int = 400):
    """A tokenizer with a ``<s>`` BOS: ``bytelevel`` BPE (GPT-2 / llama-3 style: spaces lead tokens, a number after a
    space gets a lone-space token), ``metaspace`` BPE (SentencePiece / llama-2 style, digits split), or ``bytes``
    (no merges: token id = byte value, ``<s>`` = 256, ``</s>`` = 257; nothing to train, the needle demo's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .haystack import synthetic_essays
    from .needle import DISTRACTOR_CITIES, NEEDLE_FORMAT, PREFIX, QUESTION_FORMAT

    if kind not in ("bytelevel", "metaspace", "bytes"):
        raise ValueError(f"kind must be 'bytelevel', 'metaspace' or 'bytes', got {kind!r}")
    if kind == "bytes":
        vocab = {c: b for b, c in enumerate(_byte_chars())} | {"<s>": 256, "</s>": 257}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
        tok.decoder = decoders.Metaspace()
        alphabet = list("0123456789")
    texts = [synthetic_essays(60_000, seed=5), PREFIX, QUESTION_FORMAT.format(city="Singapore")]
    texts += [NEEDLE_FORMAT.format(city=c, number=1234567890) for c in ("Singapore", *DISTRACTOR_CITIES)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(path: str, *, seed: int = 0) -> str:
    """Save a 2-layer random Llama (hidden 64, 4 heads, 2 KV heads) and its tokenizer to ``path``; return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tokenizer("bytelevel")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1 << 20,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "output/tiny-llama"))
