"""The needle demo (examples/needle_demo, run by train_scripts/needle_demo.sh): its task (easy_context/eval/facts.py),
its training rows and report, and the whole pipeline at CPU size, end to end, so that the demo cannot rot.

The end-to-end test runs the real script (`NEEDLE_DEMO_CPU=1`: a 0.1M-parameter Llama, 128 -> 512 tokens, 2 gloo
processes for training; ~50 s on 2 cores) and checks that every stage wrote its files, that no eval key reached the
training data (checked here independently of the script's own leak check), and that training made the model
retrieve the facts it never saw (an untrained model scores 0).
"""
import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest

from easy_context.eval.facts import draw_facts, find_key_leaks, key_split
from easy_context.eval.haystack import synthetic_essays
from easy_context.eval.needle import NeedleConfig
from easy_context.eval.tiny import make_tokenizer
from examples.needle_demo.report import PUBLISHED, by_depth, by_distance, record, report_markdown
from examples.needle_demo.rows import fact_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_key_spaces_are_disjoint_and_fact_draws_stay_in_theirs():
    rng = random.Random(0)
    train = draw_facts(rng, 250, split="train", key_length=2, value_digits=3)
    evals = draw_facts(rng, 80, split="eval", key_length=2, value_digits=3)
    assert {key_split(k) for k, _ in train} == {"train"} and {key_split(k) for k, _ in evals} == {"eval"}
    assert len({k for k, _ in train}) == 250 and not {k for k, _ in train} & {k for k, _ in evals}
    assert all(re.fullmatch(r"[A-Z]{2}", k) and re.fullmatch(r"\d{3}", v) for k, v in train + evals)
    # the eval share: a quarter of all keys (CRC-32 % 4), both spaces large enough for the demo's draws
    share = sum(key_split(a + b) == "eval" for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert 0.15 < share / 676 < 0.35
    with pytest.raises(ValueError, match="key_length"):
        draw_facts(rng, 1, split="eval", key_length=1)
    with pytest.raises(ValueError, match="split"):
        draw_facts(rng, 1, split="test")
    with pytest.raises(ValueError, match="raise the key length"):
        draw_facts(rng, 90, split="eval", key_length=2)



def test_near_miss_keys():
    """near_keys: keys one letter away from an earlier key of the same row (hard negatives); 0 draws as before."""
    # the draws of the version without near misses (seed 0): earlier runs' data stays reproducible
    assert draw_facts(random.Random(0), 4, split="train", key_length=3, value_digits=3) == \
        [("MYN", "242"), ("BIQ", "194"), ("JPL", "892"), ("SGQ", "411")]
    for seed in range(5):
        facts = draw_facts(random.Random(seed), 16, split="train", key_length=3, near_keys=1.0)
        keys = [k for k, _ in facts]
        assert len(set(keys)) == 16 and {key_split(k) for k in keys} == {"train"}
        for i, key in enumerate(keys[1:], 1):
            assert any(sum(a != b for a, b in zip(key, other)) == 1 for other in keys[:i]), (key, keys[:i])
    with pytest.raises(ValueError, match="near_keys"):
        draw_facts(random.Random(0), 4, split="train", near_keys=1.5)


def test_fact_rows_format_and_labels():
    tokenizer = make_tokenizer("bytes")
    rows = list(fact_rows(tokenizer, num_rows=3, seq_length=400, split="train", num_facts=4, num_questions=3,
                          key_length=3, value_digits=4, seed=1))
    for row in rows:
        ids, labels, keys = row["input_ids"], row["labels"], row["keys"]
        assert len(ids) == len(labels) == 400 and ids[0] == tokenizer.bos_token_id
        text = bytes(ids[1:]).decode()  # the byte tokenizer: token id = byte value
        assert text.startswith("Facts:\n")
        facts = dict(re.findall(r" ([A-Z]{3}): (\d{4})\.", text))
        assert sorted(facts) == sorted(keys) and all(key_split(k) == "train" for k in keys)
        # three questions at the end, about distinct facts, the first about keys[0], each followed by its answer
        asked = re.findall(r"\n\? ([A-Z]{3}): (\d{4})", text)
        assert len(asked) == 3 and asked[0][0] == keys[0] and len({k for k, _ in asked}) == 3
        assert text.endswith(f"\n? {asked[-1][0]}: {asked[-1][1]}") and all(facts[k] == v for k, v in asked)
        # other_labels=0: exactly the answers (" " + digits) carry labels, with their own ids
        labelled = [i for i, t in enumerate(labels) if t != -100]
        assert all(labels[i] == ids[i] for i in labelled)
        answers = [m.start() + 1 + len(m.group(1)) for m in re.finditer(r"(\n\? [A-Z]{3}:) \d{4}", text)]
        assert labelled == [a + j for a in answers for j in range(5)]
    # other_labels=1: every filler token too, never a fact's or question's key or value
    row = next(fact_rows(tokenizer, num_rows=1, seq_length=400, split="eval", num_facts=2, other_labels=1.0, seed=2))
    text = bytes(row["input_ids"][1:]).decode()
    unlabelled = {i - 1 for i, t in enumerate(row["labels"]) if t == -100 and i > 0}
    for m in re.finditer(r" [A-Z]{3}: \d{4}\.|\n\? [A-Z]{3}:", text):
        assert set(range(m.start(), m.end())) <= unlabelled
    assert len(unlabelled) < 60  # 2 facts (11 bytes), 1 question (6): nothing else is unlabelled
    with pytest.raises(ValueError, match="num_questions"):
        next(fact_rows(tokenizer, num_rows=1, seq_length=400, split="train", num_facts=2, num_questions=3))


def test_find_key_leaks():
    texts = ["Facts:\n On Ideas. ABC: 1234. The user builds.\n? ABC: 1234", "The QZ key. XYZ: 99."]
    assert find_key_leaks(texts, ["XYZ", "QQQ"]) == {"texts": 2, "keys_seen": 3, "leaks": ["XYZ"]}
    assert find_key_leaks(texts, ["QQQ"])["leaks"] == []
    # the premise of the check: the filler itself has no run of capitals (and no digit), so every run is a key
    assert not re.search(r"[A-Z]{2}|\d", synthetic_essays(300_000, seed=11))


def test_the_package_never_imports_the_demo():
    """examples/ sits above easy_context: no module of the package imports it, and eval/facts.py (the kv task)
    imports nothing of the package, so eval.needle -> eval.facts runs one way (they once imported each other)."""
    import ast
    import pathlib

    package = pathlib.Path(ROOT, "easy_context")
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not [n for n in names if n.split(".")[0] == "examples"], path
    facts = ast.parse((package / "eval" / "facts.py").read_text())
    assert not [node for node in ast.walk(facts) if isinstance(node, ast.ImportFrom)
                and (node.level or (node.module or "").startswith("easy_context"))]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accuracy_by_needle_distance(tmp_path):
    """Cells are bucketed by (1 - depth) x length, not by context length: a 64K cell with the needle at depth 100
    is a short-distance test. Expected buckets worked out by hand."""
    rows = [(1024, 0, True),      # 1024 before the question: <= 2K
            (65536, 100, True),   # 0: <= 2K
            (4096, 50, False),    # 2048: <= 2K (the edge belongs to the lower bucket)
            (4096, 25, True),     # 3072: 2K-4K
            (8192, 50, False),    # 4096: 2K-4K
            (8192, 0, False),     # 8192: > 4K
            (65536, 90, False)]   # 6553.6: > 4K
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"context_length": n, "depth_percent": d, "correct": c}) + "\n"
                            for n, d, c in rows))
    assert by_distance(str(path), 2048) == {"≤ 2K": (2 / 3, 3), "2K-4K": (0.5, 2), "> 4K": (0.0, 2)}
    assert by_depth(str(path)) == {"0%": (0.5, 2), "25%": (1.0, 1), "50%": (0.0, 2), "90%": (0.0, 1),
                                   "100%": (1.0, 1)}


def test_needle_demo_cpu_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "NEEDLE_DEMO_CPU": "1", "NEEDLE_DEMO_DIR": str(out), "PORT": str(_free_port()),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # this python and its accelerate
    proc = subprocess.run(["bash", os.path.join(ROOT, "train_scripts", "needle_demo.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # every stage's files
    for name in ("init", "stage1_128", "stage3_mid_256", "stage3_512"):
        assert (out / name / "config.json").exists() and (out / name / "model.safetensors").exists(), name
        assert (out / name / "tokenizer.json").exists(), name
    steps = {"stage1_128": 200, "stage3_mid_256": 10, "stage3_512": 20}
    for name, n in steps.items():
        log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == n, name
    for name, base in (("stage1_128", 10000), ("stage3_mid_256", 10000), ("stage3_512", 40000)):
        config = json.loads((out / name / "config.json").read_text())  # the raised base was trained and saved
        assert config.get("rope_parameters", config).get("rope_theta") == base, name
    for name in ("init", "short", "long"):
        folder = out / f"needle_{name}"
        assert (folder / "results.csv").exists() and (folder / "heatmap.png").stat().st_size > 1000, name
    for path in ("ppl.png", "ppl.pdf", "summary.json", "data/leak_check.json"):
        assert (out / path).stat().st_size > 100, path
    ppl_rows = (out / "ppl.csv").read_text().splitlines()
    assert ppl_rows[0] == "model,128,256,512" and len(ppl_rows) == 3
    assert [line.split("\t")[1] for line in (out / "stage_times.tsv").read_text().splitlines()] == \
        ["prepare", "short", "eval_short", "long", "eval_long"]  # stage 5 (publish) runs after the last record

    # no leak: the script's check, and an independent one here (every eval needle string and key against the text)
    assert json.loads((out / "data" / "leak_check.json").read_text())["leak"] is False
    config = NeedleConfig(task="kv", num_samples=4, num_distractor=0, key_length=2, rnd_number_digits=1)
    needles = [config.needles(s) for s in range(4)]
    from datasets import load_from_disk

    text = "".join(bytes(i for i in row if i < 256).decode() for name in ("train_short", "train_mid", "train_long")
                   for row in load_from_disk(str(out / "data" / name))["input_ids"])
    # one question per document: the text really is all the rows (half the 40 long rows are two 256-token documents)
    assert text.count("\n? ") == 200 * 16 + 10 * 8 + 20 * 1 + 20 * 2
    positions = load_from_disk(str(out / "data" / "train_long"))["position_ids"]
    assert positions[0::2] == [list(range(512))] * 20 and positions[1::2] == [list(range(256)) * 2] * 20
    for key, value, _ in needles:
        assert f" {key}: {value}." not in text and f"{key}:" not in text and key_split(key) == "eval"

    # training made the model retrieve unseen facts; the untrained model retrieves none
    acc = json.loads((out / "summary.json").read_text())["accuracy"]
    init, short, long_ = acc["init"], acc["short"], acc["long"]
    assert init["all"] <= 0.1, init
    # measured 0.83 and 0.97; chance is 0.1 (one digit); the margin allows another CPU's float rounding
    assert short["within_short"] >= 0.5 > init["within_short"], short
    assert long_["within_long"] >= 0.5 > init["within_long"], long_

    # stage 5: the published folder holds every image and number, and its report states them as the files do
    published = out / "publish"
    assert sorted(p.name for p in published.iterdir()) == sorted([*PUBLISHED.values(), "README.md"])
    summary = json.loads((published / "summary.json").read_text())
    assert summary["tokens_trained"] == {"train_short": 200 * 8 * 2 * 128, "train_mid": 10 * 4 * 2 * 256,
                                         "train_long": 20 * 2 * 512}  # steps x batch x processes x length
    report = (published / "README.md").read_text()
    run = json.loads((published / "run.json").read_text())
    assert run["device"] == "CPU" and run["settings"]["SHORT"] == "128" and "SHORT=128" in report
    assert f"{summary['model_parameters'] / 1e6:.2f}M parameters" in report
    row = "| long | " + " | ".join(f"{v:.2f}" for v in long_["by_length"].values())
    assert row in report, (row, report)
    assert "![](heatmap_short.png)" in report and ("NOT MET" in report or "MET" in report)
    assert "| long | " + " | ".join(f"{a:.2f} ({n})" for a, n in by_distance(  # the distance table, from the samples
        str(published / "samples_long.jsonl"), 128).values()) + " |" in report
    assert "| long | " + " | ".join(f"{a:.2f}" for a, _ in by_depth(str(published / "samples_long.jsonl")).values()) \
        + " |" in report  # and the depth table
    assert [i["stages"] for i in run["invocations"]] == ["0 1 2 3 4 5"]  # one invocation, on record


def test_run_record_keeps_a_later_invocations_changed_settings(tmp_path, monkeypatch):
    """Stage 0 starts run.json; an invocation of later stages with another setting adds it, and the report says so
    (a stage re-run with ROPE_MID changed once went on record with stage 0's value)."""
    monkeypatch.setenv("EASY_CONTEXT_COMMIT", "abc1234")
    monkeypatch.setenv("ROPE_MID", "1000000")
    monkeypatch.setenv("SHORT", "256")
    with pytest.raises(SystemExit, match="stage 0 starts it"):
        record(str(tmp_path), "3 4 5", ["ROPE_MID", "SHORT"])  # nothing to continue
    first = record(str(tmp_path), "0 1 2", ["ROPE_MID", "SHORT"])
    monkeypatch.setenv("ROPE_MID", "10000")
    run = record(str(tmp_path), "3 4 5", ["ROPE_MID", "SHORT"])
    assert run["settings"] == first["settings"] == {"ROPE_MID": "1000000", "SHORT": "256"}
    assert [i["stages"] for i in run["invocations"]] == ["0 1 2", "3 4 5"]
    assert run["invocations"][1]["changed"] == {"ROPE_MID": "10000"}
    assert json.loads((tmp_path / "run.json").read_text()) == run
    summary = {"accuracy": {m: {"by_length": {"256": 1.0}, "within_short": 1.0, "beyond_short": 0.0,
                                "within_long": 1.0} for m in ("init", "short", "long")},
               "perplexity": {"short": {"256": 1.2}, "long": {"256": 1.2}}, "short_length": 256,
               "long_length": 256, "model_parameters": 1e6, "tokens_trained": {"train_short": 1000}, "goals": {}}
    report = report_markdown(summary, run, [("prepare", 1.0)])
    later = run["invocations"][1]
    assert f"Stages 3 4 5 ran in a later call on {later['date']} ({later['device']}, commit abc1234): " \
        "ROPE_MID=10000." in report
    run = record(str(tmp_path), "4 5", ["ROPE_MID", "SHORT"])  # stages that ran before: a re-run
    assert f"Stages 4 5 ran again on {run['invocations'][2]['date']}" in report_markdown(summary, run, [])
