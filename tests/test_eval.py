"""Long-context evaluation (easy_context/eval, eval_needle.py, eval_ppl.py, plot.py) on a tiny random Llama and a
tokenizer trained here, with no download.

One gloo group of 2 ranks runs every distributed case: the needle predictions of each parallel mode against a
single-process forward of the unpatched model, eval_needle end to end (and its resume), and eval_ppl against an
independent single-process perplexity.
"""
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed

from easy_context.attention.registry import SEQ_ALGOS
from easy_context.eval.haystack import load_haystack
from easy_context.eval.needle import NEEDLE_FORMAT, PREFIX, QUESTION_FORMAT, build_prompt, split_answer
from easy_context.eval.tiny import make_tokenizer, save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny random Llama + byte-level tokenizer: what ``--model`` points at."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


def _text_before_is_sentence_end(tokenizer, ids, start, prefix_len):
    """Independent check: the haystack text before ``start`` ends a sentence (or is empty)."""
    before = tokenizer.decode(ids[prefix_len:start])
    return before == "" or before.rstrip().endswith((".", "?", "!"))


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_needle_prompt_construction(kind):
    tokenizer = make_tokenizer(kind)
    haystack = load_haystack(tokenizer, 2000, seed=3)
    prefix_len = len(tokenizer(PREFIX)["input_ids"])
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = QUESTION_FORMAT.format(city="Singapore")
    distractors = [("Paris", 7654321), ("Tokyo", 2468013)]
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        p = build_prompt(tokenizer, haystack, context_length=600, depth=depth, number=1234567,
                         distractors=distractors, distractor_depths=[0.3, 0.7])
        assert p.answer_start == 600 and p.input_ids[:prefix_len] == tokenizer(PREFIX)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(p.input_ids[0]) == "<s>"
        hay_len = 600 - prefix_len - len(encode(question)) - sum(e - s for s, e in [p.needle_span, *p.distractor_spans])
        # the needle: its own tokens, at the first sentence end at or after the requested depth
        s, e = p.needle_span
        assert p.input_ids[s:e] == encode(NEEDLE_FORMAT.format(city="Singapore", number=1234567))
        assert _text_before_is_sentence_end(tokenizer, p.input_ids, s, prefix_len), (depth, tokenizer.decode(
            p.input_ids[s - 5:e]))
        slack = 60 / hay_len  # a sentence is well under 60 tokens
        assert depth <= p.needle_depth <= depth + slack or (depth == 1.0 and p.needle_depth >= 1 - slack)
        for (city, number), (s, e) in zip(distractors, p.distractor_spans):
            assert p.input_ids[s:e] == encode(NEEDLE_FORMAT.format(city=city, number=number))
            assert _text_before_is_sentence_end(tokenizer, p.input_ids, s, prefix_len)
        # the answer: exactly the tokens the tokenizer gives the number after the question
        joint = encode(question + " 1234567")
        assert p.input_ids[p.answer_start - len(encode(question)):] == joint
        assert p.answer_ids == joint[len(encode(question)):] and tokenizer.decode(p.answer_ids).strip() == "1234567"
    # the llama-3 quirk: with a byte-level tokenizer the space before the number is its own token, in the answer
    q_ids, a_ids = split_answer(tokenizer, question, "1234567")
    assert q_ids == encode(question)
    if kind == "bytelevel":
        assert tokenizer.decode(a_ids[:1]) == " "
    with pytest.raises(ValueError, match="min_context_length"):
        build_prompt(tokenizer, haystack, context_length=20, depth=0.5, number=1)


def test_kv_task_prompts_and_needles():
    """--task kv (the needle demo's facts) with the byte tokenizer: every sample's key and distractor keys come from
    the eval key space, the prompt ends with the question and the answer is the value's bytes."""
    import re

    from easy_context.eval.facts import key_split
    from easy_context.eval.needle import NEEDLE_TASKS, NeedleConfig

    tokenizer = make_tokenizer("bytes")
    config = NeedleConfig(task="kv", num_samples=6, num_distractor=3, key_length=3, rnd_number_digits=4,
                          lengths=(300, 200, 300))
    assert config.context_lengths == [200, 300]
    haystack = load_haystack(tokenizer, 400, seed=3)
    keys = set()
    for s in range(6):
        key, value, distractors = config.needles(s)
        assert config.needles(s) == (key, value, distractors)  # the same in every cell
        sample_keys = [key] + [k for k, _ in distractors]
        assert len(set(sample_keys)) == 4 and all(key_split(k) == "eval" for k in sample_keys)
        assert re.fullmatch(r"[A-Z]{3}", key) and re.fullmatch(r"\d{4}", value)
        keys.add(key)
        p = build_prompt(tokenizer, haystack, context_length=300, depth=0.5, number=value, distractors=distractors,
                         distractor_depths=[0.1, 0.6, 0.9], city=key, task=NEEDLE_TASKS["kv"])
        assert p.answer_start == 300 and p.input_ids[0] == tokenizer.bos_token_id
        text = bytes(p.input_ids[1:]).decode()  # token id = byte value
        assert text.startswith("Facts:\n") and text.endswith(f"\n? {key}: {value}")
        assert bytes(p.input_ids[slice(*p.needle_span)]).decode() == f" {key}: {value}."
        assert p.answer_ids == list(f" {value}".encode())
        for (k, v), (a, b) in zip(distractors, p.distractor_spans):
            assert bytes(p.input_ids[a:b]).decode() == f" {k}: {v}."
            assert bytes(p.input_ids[a - 1:a]) in (b".", b"?")  # spliced in after a sentence
    assert len(keys) == 6  # a new key per sample
    with pytest.raises(ValueError, match="task"):
        NeedleConfig(task="passkey")
    # every fact is a sentence of its own at every depth, also at the haystack's start, whose first word has no space
    # before it: "Facts:\n KEY: 123. On Ideas", never "123.On" (a text the training rows never contain)
    assert not bytes(haystack[:1]).decode().isspace()
    for depth in (0.0, 0.1, 0.5, 1.0):
        p = build_prompt(tokenizer, haystack, context_length=300, depth=depth, number=value, distractors=distractors,
                         distractor_depths=[0.0, 0.6, 0.9], city=key, task=NEEDLE_TASKS["kv"])
        assert p.answer_start == 300, depth  # the space costs the haystack a token, not the prompt its length
        text = bytes(p.input_ids[1:]).decode()
        for a, b in (p.needle_span, *p.distractor_spans):
            assert bytes(p.input_ids[b:b + 1]).decode() in (" ", "\n"), (depth, text[:80])
    assert text.startswith(f"Facts:\n {distractors[0][0]}: {distractors[0][1]}. ")  # the distractor at depth 0.0


def _reference_predictions(model, ids, start, count):
    """Argmax (and top-2 margin) of the unpatched full forward at the positions predicting the answer."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1:start - 1 + count].float()
    top = logits.topk(2, dim=-1).values
    return logits.argmax(-1), top[:, 0] - top[:, 1]


def _reference_ppl(model, docs, max_length, bos_id, sliding_window=None):
    """Single-process perplexity, written independently: every token of a window scored once (seed semantics)."""
    nll, count = 0.0, 0
    span = max_length - 1
    for doc in docs:
        if sliding_window is None:
            doc = doc[:span]
        scored_upto, begin = 0, 0
        while True:
            end = min(begin + span, len(doc))
            ids = torch.tensor([[bos_id] + doc[begin:end]])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
            for t in range(max(scored_upto, begin), end):  # token doc[t] sits at ids index t - begin + 1
                nll -= logp[t - begin, doc[t]].item()
                count += 1
            scored_upto = end
            if end == len(doc) or sliding_window is None:
                break
            begin += sliding_window
    return math.exp(nll / count)


def _eval_worker(rank, world, model_dir, out_dir):
    from transformers import AutoModelForCausalLM

    import easy_context.eval.needle as needle
    import easy_context.eval.needle_grid as grid
    from easy_context.eval.common import load_model
    from easy_context.eval.ppl import load_documents

    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").float().eval()
    checked = 0
    # 1. SP predictions at the answer positions == single-process predictions, every parallel mode
    for algo in SEQ_ALGOS:
        model, tokenizer = load_model(model_dir, algo, "cpu")
        haystack = load_haystack(tokenizer, 700, seed=1)
        for length, depth in ((301, 0.0), (512, 0.5), (333, 1.0)):  # odd lengths: padding inside the SP forward
            p = build_prompt(tokenizer, haystack, context_length=length, depth=depth, number=8052741,
                             distractors=[("Berlin", 1234567)], distractor_depths=[0.4])
            got = needle.answer_predictions(model, torch.tensor([p.input_ids]), p.answer_start, len(p.answer_ids),
                                            seq_algo=algo, device="cpu")
            want, margin = _reference_predictions(reference, p.input_ids, p.answer_start, len(p.answer_ids))
            clear = margin > 1e-4  # a near-tie may flip under float32 re-association; none expected at this size
            assert torch.equal(got[clear], want[clear]), (algo, length, depth, got, want)
            checked += int(clear.sum())

    # 2. eval_needle end to end; a re-run skips finished cells, a larger grid runs only the new ones
    calls = []
    original = grid.answer_predictions
    grid.answer_predictions = lambda *a, **k: calls.append(1) or original(*a, **k)
    eval_needle = _script("eval_needle")
    args = ["--model", model_dir, "--parallel_mode", "zigzag_ring_attn", "--min_context_length", "320",
            "--max_context_length", "384", "--context_interval", "64", "--depth_interval", "0.5", "--num_samples",
            "2", "--num_distractor", "2", "--output_dir", out_dir]
    first = eval_needle.main(args)
    n_first = len(calls)
    again = eval_needle.main(args)
    n_again = len(calls) - n_first
    args[args.index("--max_context_length") + 1] = "448"
    grown = eval_needle.main(args)
    n_grown = len(calls) - n_first - n_again
    grid.answer_predictions = original
    # data_parallel: each rank runs its own samples; their records are gathered to rank 0
    args[args.index("--parallel_mode") + 1] = "data_parallel"
    args[args.index("--output_dir") + 1] = out_dir + "_dp"
    dp = eval_needle.main(args)

    # 3. eval_ppl: SP perplexity (zigzag, truncate and sliding windows) and data_parallel == single-process
    eval_ppl = _script("eval_ppl")
    ppl_csv = os.path.join(out_dir, "ppl.csv")
    common = ["--model", model_dir, "--synthetic", "--samples", "3", "--min-tokens", "96", "--max-tokens", "384",
              "--hide-progress"]
    sp_trunc = eval_ppl.main(common + ["--truncate", "--parallel-mode", "usp_attn", "--output-file", ppl_csv])
    sp_slide = eval_ppl.main(common + ["--sliding-window", "80", "--parallel-mode", "zigzag_ring_attn",
                                       "--output-file", os.path.join(out_dir, "ppl_slide.csv")])
    dp_trunc = eval_ppl.main(common + ["--truncate", "--parallel-mode", "data_parallel",
                                       "--output-file", os.path.join(out_dir, "ppl_dp.csv")])
    _, tokenizer = load_model(model_dir, "data_parallel", "cpu")
    docs = load_documents(tokenizer, synthetic_tokens=384, samples=3)
    ref_trunc = [_reference_ppl(reference, docs, n, tokenizer.bos_token_id) for n in (96, 192, 384)]
    ref_slide = [_reference_ppl(reference, docs, n, tokenizer.bos_token_id, sliding_window=80) for n in (96, 192, 384)]
    return {"checked": checked, "first": first, "again": again, "grown": grown, "dp": dp,
            "calls": (n_first, n_again, n_grown), "ppl": (sp_trunc[0][1], sp_slide[0][1], dp_trunc[0][1]),
            "ref": (ref_trunc, ref_slide)}


def test_eval_distributed(model_dir, tmp_path):
    out_dir = str(tmp_path / "needle")
    results = run_distributed(_eval_worker, 2, model_dir, out_dir, timeout=200)
    r = results[0]
    assert r["checked"] >= 5 * 3 * 3, "too few answer positions had a clear argmax to compare"
    # eval_needle: 2 lengths x 3 depths, each sample on both ranks together (zigzag): 6 cells x 2 samples
    assert r["calls"] == (12, 0, 6)
    cells = {(c["context_length"], c["depth_percent"]) for c in r["grown"]["cells"]}
    assert cells == {(n, d) for n in (320, 384, 448) for d in (0, 50, 100)}
    assert r["again"]["cells"] == r["first"]["cells"]
    import pandas as pd

    table = pd.read_csv(os.path.join(out_dir, "results.csv"))
    assert len(table) == 9 and set(table.columns) >= {"context_length", "depth_percent", "score"}
    assert os.path.getsize(os.path.join(out_dir, "heatmap.png")) > 1000
    assert os.path.exists(os.path.join(out_dir, "results.json"))
    # samples.jsonl: every sample of every cell, once, and its verdicts add up to the cell's count (zigzag: every
    # rank runs every sample; data_parallel: sample s on rank s % 2, gathered)
    for folder, run in ((out_dir, r["grown"]), (out_dir + "_dp", r["dp"])):
        with open(os.path.join(folder, "samples.jsonl")) as f:
            samples = [json.loads(line) for line in f]
        assert len(samples) == 9 * 2, folder
        for cell in run["cells"]:
            mine = [a for a in samples if (a["context_length"], a["depth_percent"]) ==
                    (cell["context_length"], cell["depth_percent"])]
            assert sorted(a["sample"] for a in mine) == [0, 1] and sum(a["correct"] for a in mine) == cell["correct"]
            assert all(a["correct"] == (a["predicted"] == a["expected"]) for a in mine), mine
    assert results[1]["grown"] == r["grown"]
    # eval_ppl: exact against the independent single-process reference, every rank agrees
    sp_trunc, sp_slide, dp_trunc = r["ppl"]
    ref_trunc, ref_slide = r["ref"]
    for got, want in ((sp_trunc, ref_trunc), (dp_trunc, ref_trunc), (sp_slide, ref_slide)):
        assert got == pytest.approx(want, rel=1e-4)
    assert sp_slide[0] != pytest.approx(sp_trunc[0], rel=1e-3)  # the windows really differ
    assert results[1]["ppl"] == r["ppl"]

    # plot.py from two CSVs
    plot = _script("plot")
    written = plot.main([os.path.join(out_dir, "ppl.csv"), os.path.join(out_dir, "ppl_slide.csv"), "--output",
                         str(tmp_path / "ppl"), "--xmax", "400"])
    assert all(os.path.getsize(p) > 1000 for p in written) and [p[-3:] for p in written] == ["png", "pdf"]


def test_eval_ppl_under_deepspeed_zero3(model_dir, tmp_path):
    """`accelerate launch --config_file accelerate_configs/zero3_inference.yaml eval_ppl.py` on 2 CPU processes:
    weights in ZeRO-3 partitions, the same perplexity as the independent single-process reference."""
    import socket
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from easy_context.eval.common import load_model
    from easy_context.eval.ppl import load_documents

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    csv = tmp_path / "ppl_zero3.csv"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "zero3_inference.yaml"), "--num_processes", "2",
           "--main_process_port", str(port), os.path.join(ROOT, "eval_ppl.py"), "--model", model_dir, "--synthetic",
           "--samples", "3", "--min-tokens", "96", "--max-tokens", "384", "--hide-progress", "--truncate",
           "--parallel-mode", "zigzag_ring_attn", "--output-file", str(csv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pandas as pd

    got = pd.read_csv(csv).iloc[0, 1:].astype(float).tolist()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").float().eval()
    _, tokenizer = load_model(model_dir, "data_parallel", "cpu")
    docs = load_documents(tokenizer, synthetic_tokens=384, samples=3)
    want = [_reference_ppl(reference, docs, n, tokenizer.bos_token_id) for n in (96, 192, 384)]
    assert got == pytest.approx(want, rel=1e-4)  # same tolerance as the eval_ppl checks above


# ----------------------------------------------------------------------------- eval_needle re-runs into one folder
# (case, how the re-run differs from the first run: flags, or a callable(paths) -> flags, and what it must do: reuse
# every cell (0 new), run only the new cells (n), or be refused before the model is loaded, naming what differs)
def _retrained(paths):
    weights = os.path.join(paths["model"], "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as if saved again by another training run
    return []


def _other_model(paths):
    import shutil

    other = os.path.join(paths["tmp"], "other-model")
    shutil.copytree(paths["model"], other)
    return ["--model", other]


def _haystack(paths):
    from easy_context.eval.haystack import synthetic_essays

    folder = os.path.join(paths["tmp"], "essays")
    os.makedirs(folder)
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write(synthetic_essays(4000, seed=9))
    return ["--haystack-dir", folder]


def _older_results(paths):
    os.remove(os.path.join(paths["out"], "settings.json"))
    return []


NEEDLE_RERUNS = [
    ("the same settings", [], 0),
    ("a larger grid", ["--context-lengths", "160,192"], 2),
    ("another model", _other_model, r"model: '.*tiny_needle_model' then, '.*other-model' now"),
    ("the model retrained in place", _retrained, r"model: .*tiny_needle_model has changed files since"),
    ("another task", ["--task", "kv"], "task: 'magic_number' then, 'kv' now"),
    ("another seed", ["--seed", "7"], "seed: 24242424 then, 7 now"),
    ("more samples", ["--num-samples", "2"], "num_samples: 1 then, 2 now"),
    ("distractors", ["--num-distractor", "1"], "num_distractor: 0 then, 1 now"),
    ("other digits", ["--rnd-number-digits", "5"], "rnd_number_digits: 7 then, 5 now"),
    ("another RoPE base", ["--rope-theta", "500"], "rope_theta: None then, 500.0 now"),
    ("another dtype", ["--dtype", "bfloat16"], "dtype: 'float32' then, 'bfloat16' now"),
    ("a haystack folder", _haystack, "haystack: 'synthetic' then, '.*essays' now"),
    ("results of an older eval_needle.py", _older_results, "without a readable settings.json"),
]


@pytest.fixture(scope="module")
def needle_first_run(model_dir, tmp_path_factory):
    """A model folder of its own (one row changes its files) and the output of a first eval_needle run with it."""
    import shutil

    model = str(tmp_path_factory.mktemp("needle_rerun") / "tiny_needle_model")
    shutil.copytree(model_dir, model)
    out = str(tmp_path_factory.mktemp("needle_rerun_out") / "first")
    _script("eval_needle").main(["--model", model, "--context-lengths", "160", "--depth-interval", "1",
                                 "--num-samples", "1", "--output-dir", out])
    return model, out


@pytest.mark.parametrize("case, change, expect", NEEDLE_RERUNS, ids=[row[0] for row in NEEDLE_RERUNS])
def test_eval_needle_rerun_reuses_cells_only_of_the_same_settings(case, change, expect, needle_first_run, tmp_path,
                                                                  monkeypatch):
    import shutil

    import easy_context.eval.common as common
    import easy_context.eval.needle_grid as needle

    model, first = needle_first_run
    out = str(tmp_path / "out")
    shutil.copytree(first, out)
    weights = os.path.join(model, "model.safetensors")
    times = os.stat(weights)
    calls = {"load": 0, "forward": 0}
    load, forward = common.load_model, needle.answer_predictions
    monkeypatch.setattr(common, "load_model", lambda *a, **k: calls.__setitem__("load", calls["load"] + 1) or
                        load(*a, **k))
    monkeypatch.setattr(needle, "answer_predictions", lambda *a, **k: calls.__setitem__(
        "forward", calls["forward"] + 1) or forward(*a, **k))
    argv = ["--model", model, "--context-lengths", "160", "--depth-interval", "1", "--num-samples", "1",
            "--output-dir", out]
    try:
        argv += change({"model": model, "tmp": str(tmp_path), "out": out}) if callable(change) else change
        if isinstance(expect, int):
            result = _script("eval_needle").main(argv)
            assert calls["forward"] == expect and len(result["cells"]) == 2 + expect
        else:
            with pytest.raises(ValueError, match=expect + ".*pass another --output-dir"):
                _script("eval_needle").main(argv)
            assert calls == {"load": 0, "forward": 0}  # refused before the model is loaded
    finally:
        os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
