"""Stage 0 of the needle demo: the byte tokenizer, the untrained model, the corpora and the leak check
(:func:`prepare`; what it writes: :mod:`examples.needle_demo`)."""
from __future__ import annotations

import json
import os
import shutil

from .rows import fact_rows


def _generate(shards: list[int], tokenizer, num_rows: int, num_shards: int, with_labels: bool, kw: dict,
              packed: dict | None = None):
    """Rows of :func:`fact_rows` for ``shards`` (shard ``i`` of ``num_shards``: its share of ``num_rows``, seed
    ``1000 * kw["seed"] + i``), with their keys; ``with_labels=False``: no labels and no BOS (eval_ppl.py documents:
    it prepends the BOS per window).

    ``packed`` (``{"share", "doc_length", "doc_facts"}``): that share of the rows, spread evenly, is made of whole
    documents of ``doc_length`` tokens (fact rows of their own, ``doc_facts`` facts and questions each), with
    ``position_ids`` restarting at 0 at each (train.py then lets each attend only to itself); every row gets
    ``position_ids``."""
    for shard in shards:
        first, end = num_rows * shard // num_shards, num_rows * (shard + 1) // num_shards
        seed = 1000 * kw["seed"] + shard
        is_packed = [bool(packed) and int((i + 1) * packed["share"]) > int(i * packed["share"])
                     for i in range(first, end)]  # row i of the whole set; the packed rows spread evenly
        rows = fact_rows(tokenizer, num_rows=is_packed.count(False), **{**kw, "seed": seed})
        if any(is_packed):
            per_row = kw["seq_length"] // packed["doc_length"]
            docs = fact_rows(tokenizer, num_rows=is_packed.count(True) * per_row,
                             **{**kw, "seq_length": packed["doc_length"], "num_facts": packed["doc_facts"],
                                "num_questions": packed["doc_facts"], "seed": seed + 500})
        for row_is_packed in is_packed:
            if row_is_packed:
                parts = [next(docs) for _ in range(per_row)]
                row = {k: [x for part in parts for x in part[k]] for k in ("input_ids", "labels", "keys")}
                row["position_ids"] = list(range(packed["doc_length"])) * per_row
            else:
                row = next(rows)
                if packed:
                    row["position_ids"] = list(range(len(row["input_ids"])))
            if not with_labels:
                row = {"input_ids": row["input_ids"][1:], "keys": row["keys"]}
            yield row


def _write_rows(tokenizer, path: str, *, num_rows: int, num_proc: int, with_labels: bool = True,
                packed: dict | None = None, **kw):
    """Write :func:`fact_rows` (columns ``input_ids``, ``labels``, ``keys``; ``position_ids`` with ``packed``, see
    :func:`_generate`) to a ``save_to_disk`` folder, generated in ``num_proc`` processes, under ``path.tmp`` and
    renamed when complete."""
    from datasets import Dataset, Features, Sequence, Value

    ids = Sequence(Value("int32"))
    columns = {"input_ids": ids} | ({"labels": ids} if with_labels else {}) | {"keys": Sequence(Value("string"))}
    columns |= {"position_ids": ids} if packed else {}
    shards = max(1, min(num_proc, num_rows))
    cache = path + ".cache"
    data = Dataset.from_generator(_generate, features=Features(columns), cache_dir=cache,
                                  num_proc=shards if shards > 1 else None,
                                  gen_kwargs={"shards": list(range(shards)), "tokenizer": tokenizer,
                                              "num_rows": num_rows, "num_shards": shards,
                                              "with_labels": with_labels, "kw": kw, "packed": packed})
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    data.save_to_disk(path + ".tmp")
    del data
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)


def _texts(tokenizer, path: str, num_proc: int):
    """The decoded text of every row of a saved dataset (read back from disk, decoded in ``num_proc`` processes)."""
    from datasets import load_from_disk

    data = load_from_disk(path)
    parallel = num_proc if num_proc > 1 and len(data) >= 4 * num_proc else None
    texts = data.map(lambda b: {"text": tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)},
                     batched=True, batch_size=64, remove_columns=data.column_names, num_proc=parallel,
                     keep_in_memory=True)
    return texts["text"]


def prepare(args) -> dict:
    """Tokenizer, untrained model, corpora and leak check (see the module docstring); returns the leak report."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from easy_context.eval.facts import find_key_leaks
    from easy_context.eval.needle import NeedleConfig
    from easy_context.eval.tiny import make_tokenizer

    out = args.output_dir
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tokenizer = make_tokenizer("bytes")
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=len(tokenizer),
                         max_position_embeddings=args.short_length, rope_theta=args.rope_theta,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(os.path.join(out, "init"))
    tokenizer.save_pretrained(os.path.join(out, "init"))
    params = sum(p.numel() for p in model.parameters())
    task = dict(key_length=args.key_length, value_digits=args.value_digits, num_proc=args.num_proc)
    # each corpus its own seed; the eval needles (and their haystack) use eval_needle.py's --seed
    # (name, length, rows, facts, questions, seed, near keys, packed): the short stage's rows have no near misses
    # (they stall a model still looking for the lookup); the extension's (mid, long) have --near-keys; a share of the
    # long rows (--long-packed) can be made of mid-length documents, as the mid rows are
    if args.long_packed and (not 0 < args.long_packed <= 1 or args.long_length % args.mid_length):
        raise ValueError(f"--long-packed {args.long_packed} needs a share in (0, 1] and a --long-length "
                         f"({args.long_length}) that is a multiple of --mid-length ({args.mid_length})")
    packed = {"share": args.long_packed, "doc_length": args.mid_length, "doc_facts": args.mid_facts} \
        if args.long_packed else None
    corpora = [
        ("train_short", args.short_length, args.short_rows, args.short_facts, args.short_questions, args.seed + 1,
         0.0, None),
        ("train_mid", args.mid_length, args.mid_rows, args.mid_facts, args.mid_facts, args.seed + 4, args.near_keys,
         None),
        ("train_long", args.long_length, args.long_rows, args.long_facts, args.long_questions, args.seed + 2,
         args.near_keys, packed)]
    corpora = [c for c in corpora if c[2]]  # no mid stage: no mid rows
    for name, length, rows, facts, questions, seed, near, pack in corpora:
        _write_rows(tokenizer, os.path.join(out, "data", name), num_rows=rows, seq_length=length, split="train",
                    num_facts=facts, num_questions=questions, other_labels=args.other_labels, near_keys=near,
                    seed=seed, packed=pack, **task)
    _write_rows(tokenizer, os.path.join(out, "data", "ppl"), num_rows=args.ppl_docs, with_labels=False,
                seq_length=args.ppl_length + 1, split="eval", num_facts=args.eval_distractors + 1, num_questions=1,
                seed=args.seed + 3, **task)
    # the leak check: every key eval_needle.py will ask or show (needles and distractors) and every key of the
    # perplexity documents, against every run of capitals in the training text as written to disk
    needle = NeedleConfig(num_samples=args.eval_samples, num_distractor=args.eval_distractors, task="kv",
                          key_length=args.key_length, rnd_number_digits=args.value_digits, seed=args.eval_seed)
    eval_keys = set()
    for sample in range(args.eval_samples):
        key, _, distractors = needle.needles(sample)
        eval_keys |= {key} | {k for k, _ in distractors}
    from datasets import load_from_disk

    eval_keys |= {k for keys in load_from_disk(os.path.join(out, "data", "ppl"))["keys"] for k in keys}
    report = {"eval_keys": len(eval_keys), "model_parameters": params}
    trained = [name for name, *_ in corpora]
    for name, length, *_ in corpora:
        found = find_key_leaks(_texts(tokenizer, os.path.join(out, "data", name), args.num_proc), eval_keys)
        report[name] = {"rows": found["texts"], "seq_length": length, "distinct_keys_in_text": found["keys_seen"],
                        "eval_keys_found": found["leaks"]}
    report["leak"] = any(report[n]["eval_keys_found"] for n in trained)
    with open(os.path.join(out, "data", "leak_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"prepare: {params / 1e6:.2f}M parameters; leak check over {report['eval_keys']} eval keys: "
          f"{'LEAK' if report['leak'] else 'none found'} ("
          f"{' + '.join(str(report[n]['distinct_keys_in_text']) for n in trained)} distinct training keys) -> {out}")
    return report
