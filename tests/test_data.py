"""easy_context/data/ and prepare_data.py: packing a corpus with a locally trained tokenizer (round trip), the
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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(path, chat_template=None):
    """A byte-level BPE tokenizer trained here on the corpus (byte-level: decoding gives the text back exactly);
    with ``chat_template``, ChatML's turn markers are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    turn_markers = ["<|im_start|>", "<|im_end|>"] if chat_template else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", *turn_markers],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(200, seed=1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=turn_markers)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("chat_tok"), CHATML)


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


def _earlier_output(out, src, tokenizer_dir):
    data.prepare_corpus(str(src), tokenizer_dir, 16, str(out))


def _foreign_dataset(out, *_):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[1, 2, 3]]}).save_to_disk(str(out))


def _killed_while_swapping(out, src, tokenizer_dir):
    """A run killed after moving the earlier output aside into <out>.tmp/old and before moving the new one in."""
    _earlier_output(out, src, tokenizer_dir)
    tmp = out.parent / (out.name + ".tmp")
    tmp.mkdir()
    (tmp / ".prepare_data_tmp").touch()
    out.rename(tmp / "old")


def _user_files(out, *_):
    out.mkdir()
    (out / "corpus.txt").write_text("my only copy")
    (out / "notes.md").write_text("notes")


# (case, how the folder looks before, --output-dir relative to the test folder, --overwrite-output-dir, the error
# or None: written). Whatever the folder held that prepare_data.py did not write must survive every row.
OUTPUT_DIR_CASES = [
    ("new folder", None, "out", False, None),
    ("empty folder", lambda out, *_: out.mkdir(), "out", False, None),
    ("its own earlier output", _earlier_output, "out", False, None),
    ("a killed run's swap", _killed_while_swapping, "out", False, None),
    ("a user's folder", _user_files, "out", False, r"did not write \(corpus.txt, notes.md\).*new or empty folder"),
    ("a user's folder, overwrite", _user_files, "out", True, r"did not write .*even with --overwrite-output-dir"),
    ("its output plus a user's file", lambda out, *a: (_earlier_output(out, *a), (out / "notes.md").touch()), "out",
     True, r"did not write \(notes.md\)"),
    ("a dataset it did not mark", _foreign_dataset, "out", False, "pass --overwrite-output-dir to replace it"),
    ("a dataset it did not mark, overwrite", _foreign_dataset, "out", True, None),
    ("the working folder", _user_files, ".", True, "is the working folder"),
    ("the input's folder", None, "src", False, "--input .* the same folder or one holds the other"),
    ("<out>.tmp of someone else", lambda out, *_: (out.parent / "out.tmp").mkdir(), "out", False,
     "out.tmp exists and was not made by prepare_data.py"),
]


@pytest.mark.parametrize("case, before, where, overwrite, error", OUTPUT_DIR_CASES,
                         ids=[c[0] for c in OUTPUT_DIR_CASES])
def test_prepare_writes_only_its_own_output_folder(tmp_path, tokenizer_dir, monkeypatch, case, before, where,
                                                   overwrite, error):
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _corpus(20)))
    out = tmp_path / "out"
    if before is not None:
        before(out, src, tokenizer_dir)
    monkeypatch.chdir(out if where == "." else tmp_path)
    theirs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl")}
    target = str(tmp_path / where) if where != "." else "."
    if error is None:
        packed = data.prepare_corpus(str(src), tokenizer_dir, 8, target, overwrite_output_dir=overwrite)
        assert len(packed[0]["input_ids"]) == 8 and data.load_train_dataset(str(out), seq_length=8)["input_ids"] == \
            packed["input_ids"]  # the new output, whole, in place of any earlier one
        assert json.loads((out / data.MARKER_FILE).read_text())["seq_length"] == 8
    else:
        with pytest.raises(ValueError, match=error):
            data.prepare_corpus(str(src), tokenizer_dir, 8, target, overwrite_output_dir=overwrite)
    assert {p: p.read_bytes() for p in theirs} == theirs  # nothing of the user's deleted or changed
    assert not (tmp_path / "out.tmp").exists() or case == "<out>.tmp of someone else"


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


# ----------------------------------------------------------------------------- packed documents and SFT


def _reference_rows(framed_docs, seq, labels=None):
    """Independent reference of documents packing: every token tagged (document, index in it) in one stream, cut
    into rows; a token's position is how many earlier tokens of its document share its row."""
    tagged = [(tok, d, None if labels is None else labels[d][i])
              for d, doc in enumerate(framed_docs) for i, tok in enumerate(doc)]
    rows = []
    for r in range(len(tagged) // seq):
        part = tagged[r * seq:(r + 1) * seq]
        rows.append({"input_ids": [t for t, _, _ in part],
                     "position_ids": [sum(1 for _, d2, _ in part[:i] if d2 == d) for i, (_, d, _) in enumerate(part)],
                     "labels": [lab for _, _, lab in part]})
    return rows


def test_pack_documents_with_positions_keeps_boundaries():
    rng = random.Random(0)
    seq = 16
    # lengths around the row size: 1-token documents, exactly a row, longer than two rows, empty
    lengths = [5, 1, 16, 3, 40, 0, 7, 15, 2, 33, 1, 9]
    docs = [[rng.randint(10, 99) for _ in range(n)] for n in lengths]
    labels = [[rng.choice([-100, tok]) for tok in doc] for doc in docs]
    bos, eos = 1, 2
    framed = [[bos, *d, eos] for d in docs]
    framed_labels = [[-100, *lab, eos] for lab in labels]

    plain = list(data.pack_documents_with_positions(({"tokens": d} for d in docs), seq, bos_id=bos, eos_id=eos))
    ref = _reference_rows(framed, seq)
    assert [r["input_ids"] for r in plain] == [r["input_ids"] for r in ref]
    assert [r["position_ids"] for r in plain] == [r["position_ids"] for r in ref]
    assert all(set(r) == {"input_ids", "position_ids"} for r in plain)
    # the same tokens as stream packing, only the positions are new
    stream = list(data.pack_documents(docs, seq, bos_id=bos, eos_id=eos))
    assert [r["input_ids"] for r in plain] == [r["input_ids"] for r in stream]
    # a document cut at a row end continues in the next row from position 0; the 40-token one spans 3 rows
    assert sum(len(d) for d in framed) // seq == len(plain) and all(len(r["input_ids"]) == seq for r in plain)
    assert all(r["position_ids"][0] == 0 for r in plain)
    assert max(max(r["position_ids"]) for r in plain) == seq - 1  # a full row of one document

    sft = list(data.pack_documents_with_positions(({"tokens": d, "labels": lab} for d, lab in zip(docs, labels)),
                                                  seq, bos_id=bos, eos_id=eos))
    ref = _reference_rows(framed, seq, framed_labels)
    assert sft == ref
    with pytest.raises(ValueError, match="labels on some documents only"):
        list(data.pack_documents_with_positions([{"tokens": [3], "labels": [3]}, {"tokens": [4]}], 4))
    with pytest.raises(ValueError, match="one label per token"):
        list(data.pack_documents_with_positions([{"tokens": [3, 4], "labels": [3]}], 4))


def _flatten(packed, column):
    return sum(packed[column], [])


def test_prepare_documents_packing(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = _corpus()
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seq = 32
    data.main(["--input", str(src), "--tokenizer", tokenizer_dir, "--seq-length", str(seq), "--output-dir",
               str(tmp_path / "docs"), "--packing", "documents"])
    packed = data.load_train_dataset(str(tmp_path / "docs"), seq_length=seq, packing="documents")
    assert packed.column_names == ["input_ids", "position_ids"]
    ids, pos = _flatten(packed, "input_ids"), _flatten(packed, "position_ids")
    stream = _stream(tokenizer, docs)
    assert ids == stream[:len(packed) * seq] and len(packed) == len(stream) // seq  # no token lost or padded
    # every document starts with the only BOS: a position is 0 exactly at a BOS or at a row start, else +1
    for t, (tok, p) in enumerate(zip(ids, pos)):
        assert p == (0 if tok == tokenizer.bos_token_id or t % seq == 0 else pos[t - 1] + 1), t
    assert any(p == 0 and tok != tokenizer.bos_token_id for tok, p in zip(ids, pos))  # some document was split
    # train.py --packing none drops the positions; a stream-packed set has none for --packing documents
    assert data.load_train_dataset(str(tmp_path / "docs"), seq_length=seq, packing="none").column_names == [
        "input_ids"]
    data.main(["--input", str(src), "--tokenizer", tokenizer_dir, "--seq-length", str(seq), "--output-dir",
               str(tmp_path / "stream")])
    assert data.load_train_dataset(str(tmp_path / "stream"), seq_length=seq).column_names == ["input_ids"]
    with pytest.raises(ValueError, match="prepare_data.py --packing documents"):
        data.load_train_dataset(str(tmp_path / "stream"), seq_length=seq, packing="documents")
    with pytest.raises(ValueError, match="prepare_data.py --packing documents"):
        data.load_train_dataset("synthetic", seq_length=seq, vocab_size=64, packing="documents")


def _examples(n=30, seed=2):
    rng = random.Random(seed)
    words = [w for w in WORDS if w != "héllo"]
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + "?",
             "".join(" " + rng.choice(words) for _ in range(rng.randint(0, 6)))) for _ in range(n)]


def test_prepare_sft_prompt_response(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = _examples()
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps({"question": p, "answer": r}) + "\n" for p, r in examples))
    seq = 24
    data.main(["--input", str(src), "--tokenizer", tokenizer_dir, "--seq-length", str(seq), "--output-dir",
               str(tmp_path / "sft"), "--sft", "--prompt-column", "question", "--response-column", "answer"])
    packed = data.load_train_dataset(str(tmp_path / "sft"), seq_length=seq)
    assert packed.column_names == ["input_ids", "labels", "position_ids"]

    # reference: prompt and response tokenised apart (they end / start at a pre-tokenizer split in this data, so
    # this is the tokenisation of the whole text); BOS and prompt -100, response and EOS their ids
    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids_ref, labels_ref, starts = [], [], []
    for p, r in examples:
        assert tok(p + r) == tok(p) + tok(r)
        starts.append(len(ids_ref))
        ids_ref += [tokenizer.bos_token_id, *tok(p), *tok(r), tokenizer.eos_token_id]
        labels_ref += [-100] * (1 + len(tok(p))) + tok(r) + [tokenizer.eos_token_id]
    n = len(packed) * seq
    assert len(packed) == len(ids_ref) // seq
    ids, labels, pos = (_flatten(packed, c) for c in ("input_ids", "labels", "position_ids"))
    assert ids == ids_ref[:n] and labels == labels_ref[:n]
    assert [t for t in range(n) if pos[t] == 0] == sorted(set(s for s in starts if s < n) | set(range(0, n, seq)))

    # --sft is documents packing; column errors name the flags
    with pytest.raises(ValueError, match="--sft implies --packing documents"):
        data.prepare_corpus(str(src), tokenizer_dir, seq, str(tmp_path / "x"), sft=True, packing="stream",
                            prompt_column="question", response_column="answer")
    with pytest.raises(ValueError, match="--prompt-column/--response-column"):
        data.prepare_corpus(str(src), tokenizer_dir, seq, str(tmp_path / "x"), sft=True)
    with pytest.raises(ValueError, match="add --sft"):
        data.prepare_corpus(str(src), tokenizer_dir, seq, str(tmp_path / "x"), prompt_column="question")


CONVERSATIONS = [
    [{"role": "system", "content": "long context"}, {"role": "user", "content": "ring attention?"},
     {"role": "assistant", "content": "zigzag ring"}, {"role": "user", "content": "token"},
     {"role": "assistant", "content": "gradient parallel sequence"}],
    [{"role": "user", "content": "attention"}, {"role": "assistant", "content": "long long context"}],
    [{"role": "user", "content": "parallel?"}, {"role": "assistant", "content": ""}],
]


def test_prepare_sft_messages_with_chat_template(tmp_path, chat_tokenizer_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    src = tmp_path / "chat.jsonl"
    convs = CONVERSATIONS * 4
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    seq = 40
    data.main(["--input", str(src), "--tokenizer", chat_tokenizer_dir, "--seq-length", str(seq), "--output-dir",
               str(tmp_path / "chat"), "--sft"])  # the messages column is found by its name
    packed = data.load_train_dataset(str(tmp_path / "chat"), seq_length=seq)

    # reference: ChatML written out by hand, turn by turn; an assistant turn's content and end marker are learned,
    # its "<|im_start|>assistant\n" header is not; no BOS/EOS (the template frames the conversation)
    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids_ref, labels_ref = [], []
    for conv in convs:
        whole = []
        for m in conv:
            head, body = tok(f"<|im_start|>{m['role']}\n"), tok(f"{m['content']}<|im_end|>\n")
            whole += head + body
            labels_ref += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
        assert whole == tok(tokenizer.apply_chat_template(conv, tokenize=False))  # the hand-written ChatML is it
        ids_ref += whole
    n = len(packed) * seq
    assert len(packed) == len(ids_ref) // seq
    assert _flatten(packed, "input_ids") == ids_ref[:n] and _flatten(packed, "labels") == labels_ref[:n]
    assert all(row[0] == 0 for row in packed["position_ids"])

    # errors that name the fix
    with pytest.raises(ValueError, match="no chat template.*--prompt-column"):
        data.prepare_corpus(str(src), tokenizer_dir, seq, str(tmp_path / "x"), sft=True)
    with pytest.raises(ValueError, match="no assistant message"):
        data.chat_tokens(tokenizer, [{"role": "user", "content": "ring"}])
    with pytest.raises(ValueError, match="role.*content"):
        data.chat_tokens(tokenizer, [{"role": "user"}])
    # a template that rewrites earlier assistant turns (as templates that drop old reasoning do)
    tokenizer.chat_template = CHATML.replace("{{ m['content'] }}",
                                             "{{ m['content'] if loop.last or m['role'] != 'assistant' else '' }}")
    with pytest.raises(ValueError, match="renders the conversation up to assistant message 2 differently"):
        data.chat_tokens(tokenizer, CONVERSATIONS[0])


def test_collator_position_ids():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2], "labels": [-100, 6, -100, 8, 9]},
            {"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 3, 4], "labels": [1, 2, 3, 4, 5]}]
    batch = data.FixedLengthCollator(4)(rows)
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, -100, 8], [1, 2, 3, 4]]))
    for bad, match in (([1, 2, 3, 4], "row 0: position_ids start at 1"),
                       ([0, 1, 3, 4], r"row 0: position_ids\[2\] = 3 after 1"),
                       ([0, 1, 2, 1], r"row 0: position_ids\[3\] = 1 after 2")):
        with pytest.raises(ValueError, match=match + ".*--packing documents"):
            data.FixedLengthCollator(4)([{"input_ids": [1, 2, 3, 4], "position_ids": bad}])
    with pytest.raises(ValueError, match="position_ids has 3 tokens, fewer than --seq-length 4"):
        data.FixedLengthCollator(4)([{"input_ids": [1, 2, 3, 4], "position_ids": [0, 1, 2]}])


def test_shift_targets_at_document_boundaries():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 12), generator=gen)
    labels = torch.where(torch.rand(3, 12, generator=gen) < 0.3, -100, ids)
    lengths = [[4, 1, 7], [12], [1, 1, 5, 5]]
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    # reference: the target of t is the next token of its own document, -100 at a document's (and the row's) end
    for source in (ids, labels):
        ref = torch.full_like(source, -100)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                ref[b, start:start + n - 1] = source[b, start + 1:start + n]
                start += n
        got = data.shift_targets(source, position_ids=pos)
        assert torch.equal(got, ref)
        assert torch.equal(data.shift_targets(source), torch.cat([source[:, 1:], torch.full((3, 1), -100)], 1))
    # one row of positions for the whole batch, as prepare_seq_parallel_inputs accepts
    got = data.shift_targets(ids, position_ids=pos[:1])
    assert torch.equal(got, data.shift_targets(ids, position_ids=pos[:1].expand(3, -1)))
    assert (got[:, [3, 4]] == -100).all() and (got[:, :3] == ids[:, 1:4]).all()
