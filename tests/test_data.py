"""easy_context/data.py and prepare_data.py: packing a corpus with a locally trained tokenizer (round trip), the
formats train.py reads, the collator/targets, and the synthetic set. No processes, no downloads.
"""
import json
import random

import pytest
import torch

from easy_context import data

WORDS = ["ring", "zigzag", "token", "context", "attention", "long", "sequence", "parallel", "gradient", "héllo"]


def _corpus(n=40, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + rng.choice([".", "!\n", " ?"])
            for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on the corpus (byte-level: decoding gives the text back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(200, seed=1), trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    return str(path)


def _stream(tokenizer, docs, bos=True, eos=True):
    out = []
    for doc in docs:
        out += ([tokenizer.bos_token_id] if bos else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
        out += [tokenizer.eos_token_id] if eos else []
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_prepare_round_trip(tmp_path, tokenizer_dir, fmt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = _corpus()
    if fmt == "jsonl":
        src = tmp_path / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    else:  # a folder of .txt files, one document each
        src = tmp_path / "txt"
        src.mkdir()
        for i, d in enumerate(docs):
            (src / f"{i:03d}.txt").write_text(d)
    seq = 32
    out = tmp_path / "packed"
    data.main(["--input", str(src), "--tokenizer", tokenizer_dir, "--seq-length", str(seq), "--output-dir", str(out)])

    packed = data.load_train_dataset(str(out), seq_length=seq)  # what train.py --dataset reads
    rows = packed["input_ids"]
    stream = _stream(tokenizer, docs)
    assert all(len(r) == seq for r in rows) and len(rows) == len(stream) // seq  # tail < seq dropped
    assert sum(rows, []) == stream[:len(rows) * seq]
    # and back to text: the documents, framed by BOS/EOS, in order
    text = tokenizer.decode(sum(rows, []))
    framed = "".join(f"<s>{d}</s>" for d in docs)
    assert framed.startswith(text) and len(text) > len(framed) // 2


def test_prepare_without_bos_eos_and_errors(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = _corpus(20)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    with pytest.raises(ValueError, match="--text-column"):
        data.prepare_corpus(str(src), tokenizer_dir, 16, str(tmp_path / "x"))
    packed = data.prepare_corpus(str(src), tokenizer_dir, 16, str(tmp_path / "p"), text_column="body",
                                 add_bos=False, add_eos=True)
    assert sum(packed["input_ids"], []) == _stream(tokenizer, docs, bos=False)[:len(packed) * 16]
    with pytest.raises(ValueError, match="nothing to pack"):
        data.prepare_corpus(str(src), tokenizer_dir, 10**6, str(tmp_path / "q"), text_column="body")


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_load_local_files_and_validation(tmp_path, ext):
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [list(range(i, i + 12)) for i in range(5)], "other": list("abcde")})
    path = tmp_path / f"d.{ext}"
    ds.to_json(path) if ext == "jsonl" else ds.to_parquet(path)
    loaded = data.load_train_dataset(str(path), seq_length=10)
    assert loaded.column_names == ["input_ids"] and loaded["input_ids"] == ds["input_ids"]
    with pytest.raises(ValueError, match="--seq-length"):
        data.load_train_dataset(str(path), seq_length=13)
    Dataset.from_dict({"text": ["a"]}).to_json(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="prepare_data.py"):
        data.load_train_dataset(str(tmp_path / "t.jsonl"), seq_length=1)


def test_collator_and_targets():
    batch = data.FixedLengthCollator(4)([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7, 8, 9]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9]]))
    assert torch.equal(data.shift_targets(batch["input_ids"]), torch.tensor([[2, 3, 4, -100], [7, 8, 9, -100]]))
    with pytest.raises(ValueError, match="--seq-length"):
        data.FixedLengthCollator(6)([{"input_ids": [1, 2]}])


def test_synthetic_is_deterministic_and_learnable():
    a = data.synthetic_dataset(8, 256, 64, seed=3)
    b = data.synthetic_dataset(8, 256, 64, seed=3)
    assert a["input_ids"] == b["input_ids"]
    assert data.synthetic_dataset(8, 256, 64, seed=4)["input_ids"] != a["input_ids"]
    ids = torch.tensor(a["input_ids"])
    # the most frequent successor of each token explains ~(1 - noise) of all transitions: a bigram model can learn it
    pairs = ids[:, :-1] * 64 + ids[:, 1:]
    counts = torch.bincount(pairs.flatten(), minlength=64 * 64).view(64, 64)
    assert 0.65 < counts.max(1).values.sum().item() / pairs.numel() < 0.9
