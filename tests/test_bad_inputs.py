"""Every bad input of the new-user trial (issue: clear errors, nothing lost), one row each: the reproduction and the
error text or exact result it must give. A hang fails instead of stalling CI: subprocesses and process groups run
under timeouts, and everything else runs in this process and raises before any collective.

Rows that need ranks share one 2-rank gloo group; the rest run in this process (train.py's loop in data_parallel
mode needs no group) or as one short subprocess where the launcher itself is the point.
"""
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
from _dist import run_distributed

from easy_context import training
from easy_context.training.checkpoints import STATE_FILE, checkpoint_problem, latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--model-config", "tiny-llama", "--init-random", "--seq-length", "32", "--report-to", "none",
         "--learning-rate", "1e-3"]
TINY = [*MODEL, "--max-train-steps", "1", "--seq-algo", "data_parallel", "--no-save-model"]


def _train(*argv):
    """train.py's loop in this process (data_parallel: no process group), accelerate's singletons reset."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return training.train(training.parse_config(list(argv)))


def _log(out):
    with open(os.path.join(out, training.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def _tiny_model(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


# ----------------------------------------------------------------------------- 1: attention arguments we lack
def test_1_attention_arguments_the_kernels_lack_are_refused_by_name():
    """An argument transformers passes that the SP kernels do not apply is refused by name, never dropped (soft-capping,
    sinks and sliding windows are applied: tests/test_families.py)."""
    from easy_context.integrations.hf import make_attention
    from easy_context.sp_config import SPAttentionConfig

    attn = make_attention(SPAttentionConfig("zigzag_ring_attn"))
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="do not implement: alibi .ALiBi biases.*data_parallel"):
        attn(torch.nn.Module(), q, q, q, None, alibi=torch.zeros(4))


def test_1b_softcap_with_a_kernel_that_cannot_apply_it_names_the_backend_that_can():
    from easy_context import apply_seq_parallel_monkey_patch

    model = _tiny_model("gemma2")
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, backend="cudnn")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="'cudnn' cannot apply attention logit soft-capping; use backend='math'"):
            model(torch.randint(0, 64, (1, 8)), position_ids=torch.arange(8)[None])
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- 2: prepare_data's bad inputs
def _prepare_data_error(capsys, argv):
    """prepare_data.py's main on ``argv``: it must end with exit status 2 and one error line (no traceback)."""
    from easy_context.data import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err and err[-1].startswith("prepare_data.py: error: "), err
    return err[-1]


@pytest.mark.parametrize("length", ["0", "-5", "1"])
def test_2_prepare_data_rejects_a_length_below_two_before_any_work(length, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 50)
    assert "at least 2 tokens" in _prepare_data_error(capsys, [
        "--input", str(corpus), "--tokenizer", str(tmp_path / "nowhere"), "--seq-length", length,
        "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_2b_prepare_data_names_a_missing_tokenizer_or_input(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world")
    assert "--tokenizer ./no/such/tokenizer: no such file" in _prepare_data_error(capsys, [
        "--input", str(corpus), "--tokenizer", "./no/such/tokenizer", "--seq-length", "8", "--output-dir",
        str(tmp_path / "o")])
    assert "--input" in _prepare_data_error(capsys, [
        "--input", str(tmp_path / "none.txt"), "--tokenizer", "x", "--seq-length", "8", "--output-dir",
        str(tmp_path / "o")])


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from easy_context.eval.tiny import make_tokenizer

    path = str(tmp_path_factory.mktemp("bytes_tokenizer"))
    make_tokenizer("bytes").save_pretrained(path)
    return path


# (input file, its bytes, extra flags, what the one error line must say besides the file's name)
PREPARE_DATA_BAD_INPUTS = [
    ("empty.jsonl", b"", [], "is empty: nothing to tokenise"),
    ("latin1.txt", "first line\ncaf\xe9\n".encode("latin-1"), [], r"line 2 is not UTF-8 .*iconv"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [], r"line 2 is not UTF-8 text \(byte 0xe9"),
    ("numbers.jsonl", b'{"text": 5}\n{"text": 6}\n', [], r"row 1: the 'text' column holds int 5, not text"),
    ("mixed.jsonl", b'{"text": "ok"}\n{"text": 7}\n', [], r"row 2: the 'text' column holds int 7"),
    ("null.jsonl", b'{"text": "ok"}\n{"text": null}\n', [], r"row 2: the 'text' column holds no value \(null\)"),
    ("body.jsonl", b'{"body": "ok"}\n', [], r"has no 'text' column .*--text-column"),
    ("sft.jsonl", b'{"prompt": "a?"}\n', ["--sft"], r"no 'response' column .*--response-column"),
    ("sft_int.jsonl", b'{"prompt": "a?", "response": "b"}\n{"prompt": 3, "response": "c"}\n', ["--sft"],
     r"row 2: the prompt of an SFT example is int"),
]


@pytest.mark.parametrize("name, content, flags, error", PREPARE_DATA_BAD_INPUTS,
                         ids=[row[0] for row in PREPARE_DATA_BAD_INPUTS])
def test_prepare_data_bad_input_is_one_error_naming_file_and_row(name, content, flags, error, tmp_path, capsys,
                                                                  byte_tokenizer):
    import re

    (tmp_path / name).write_bytes(content)
    line = _prepare_data_error(capsys, ["--input", str(tmp_path / name), "--tokenizer", byte_tokenizer,
                                        "--seq-length", "4", "--output-dir", str(tmp_path / "out"), *flags])
    assert name in line and re.search(error, line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# ----------------------------------------------------------------------------- 3: no position_ids under SP
def _positions_worker(rank, world):
    from transformers import LlamaConfig, LlamaForCausalLM

    from easy_context import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    out = {}
    for algo in ("zigzag_ring_attn", "ulysses_attn"):  # ulysses: rank 0's shard does start at 0
        m = copy.deepcopy(model)
        apply_seq_parallel_monkey_patch(algo, m)
        p = prepare_seq_parallel_inputs(algo, torch.randint(0, 64, (1, 16)), None, None, rank, world, "cpu")
        try:
            m(p["local_input_ids"])  # no position_ids: transformers would number the shard from 0
            out[algo] = "no error"
        except ValueError as e:
            out[algo] = str(e)
        m(p["local_input_ids"], position_ids=p["local_position_ids"])  # the right call still works
    return out


def test_3_forward_without_global_positions_raises_on_every_rank():
    for per_rank in run_distributed(_positions_worker, 2):
        for algo, msg in per_rank.items():
            assert "local_position_ids" in msg, (algo, msg)


# ----------------------------------------------------------------------------- 4, 15: output folder, checkpoints
def test_4_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = str(tmp_path / "run")
    _train(*TINY, "--output-dir", out)
    earlier = "holds an earlier run .*--resume-from-checkpoint latest.*--overwrite-output-dir"
    with pytest.raises(ValueError, match=earlier):
        _train(*TINY, "--output-dir", out)
    assert len(_log(out)) == 1  # nothing appended by the refused run
    _train(*TINY, "--output-dir", out, "--overwrite-output-dir", "--max-train-steps", "2")
    assert [r["step"] for r in _log(out)] == [1, 2]  # the old run's log is gone


# what an earlier run in --output-dir left, and whether --overwrite-output-dir removes it: the run's own outputs (log,
# checkpoints, TensorBoard events under any --project-name) go, everything else stays
OVERWRITE_CASES = [
    (training.LOG_FILE, "run"),
    ("checkpoints/step_1/" + STATE_FILE, "run"),
    ("old_project/events.out.tfevents.*", "run"),
    ("old_project/notes.txt", "user"),  # a user's file next to the events (and so their folder) stays
    ("notes.md", "user"),
    ("data/corpus.jsonl", "user"),
]


def test_overwrite_output_dir_removes_only_the_earlier_runs_outputs(tmp_path):
    import glob
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    out = tmp_path / "run"
    _train(*TINY, "--report-to", "tensorboard", "--project-name", "old_project", "--checkpointing-steps", "1",
           "--output-dir", str(out))
    for path, owner in OVERWRITE_CASES:
        if owner == "user":
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_text("mine")
        assert glob.glob(str(out / path)), path
    aside = [training.LOG_FILE, "checkpoints"]
    for name in aside:
        os.rename(out / name, tmp_path / name)
    with pytest.raises(ValueError, match=r"holds an earlier run \(TensorBoard events\)"):  # the events alone
        _train(*TINY, "--report-to", "tensorboard", "--output-dir", str(out))
    for name in aside:
        os.rename(tmp_path / name, out / name)
    _train(*TINY, "--report-to", "tensorboard", "--overwrite-output-dir", "--max-train-steps", "2",
           "--output-dir", str(out))
    assert [r["step"] for r in _log(out)] == [1, 2]  # the new run's log only
    for path, owner in OVERWRITE_CASES[1:]:
        assert bool(glob.glob(str(out / path))) == (owner == "user"), (path, owner)
    assert len(glob.glob(str(out / "easy_context" / "events.out.tfevents.*"))) == 1  # the new run's own


def test_15_checkpoints_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "ckpt"
    _train(*TINY, "--output-dir", str(out), "--max-train-steps", "3", "--checkpointing-steps", "1",
           "--checkpoints-total-limit", "2")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2", "step_3"]
    assert checkpoint_problem(str(out / "checkpoints" / "step_3")) is None


# ----------------------------------------------------------------------------- 5: incomplete checkpoints
def _fake_checkpoint(root, step, *, state=True, truncate=False):
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(path / "model.safetensors"))  # a readable header: resume checks it
    size = (path / "model.safetensors").stat().st_size
    if state:
        (path / STATE_FILE).write_text(json.dumps({"completed_steps": step, "files": {"model.safetensors": size}}))
    if truncate:
        (path / "model.safetensors").write_bytes(b"x" * 10)
    return path


def test_5_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    good = _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 3, truncate=True)
    _fake_checkpoint(root, 4, state=False)
    (root / "step_5").mkdir()  # empty
    (root / "step_6.tmp").mkdir()  # a save that was killed: never a candidate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(str(tmp_path)) == str(good)
    text = " ".join(str(w.message) for w in caught)
    assert "step_5" in text and "step_4" in text and "truncated" in text
    (good / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- 6, 8, 12, 13: flags and paths
def test_6_a_config_file_of_any_name_loads(tmp_path):
    path = tmp_path / "heads3.json"
    path.write_text(json.dumps(dict(model_type="llama", hidden_size=48, num_attention_heads=3, num_hidden_layers=1,
                                    intermediate_size=64, vocab_size=100)))
    assert training.load_config(str(path)).num_attention_heads == 3


@pytest.mark.parametrize("argv, error, match", [
    (["--model", "/no/such/path"], FileNotFoundError, "--model /no/such/path: no such file or folder"),
    (["--model-config", "./missing/config.json", "--init-random"], FileNotFoundError, "--model-config ./missing"),
    (["--model-config", "tiny-llama", "--init-random", "--seq-length", "1"], ValueError, "at least 2 tokens"),
    (["--model-config", "tiny-llama", "--init-random", "--ring-degree", "2"], ValueError,
     "--ring-degree is a usp_attn option"),
    (["--model-config", "tiny-llama"], ValueError, "--init-random"),
])
def test_8_12_bad_flags_fail_before_anything_is_created(argv, error, match, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(error, match=match):
        training.parse_config([*argv, "--output-dir", str(out), "--report-to", "none"])
    assert not out.exists()


# anything that looks like a path (a data file suffix, /, ./, ../, more than one folder, or an existing first folder)
# is a local path: missing, it is "no such file" at once, never a hub lookup (retries, tracebacks, after the model)
@pytest.mark.parametrize("spec", ["data/missing.jsonl", "missing.parquet", "./missing", "/no/such/data",
                                  "tests/no_such_folder", "a/b/c", "my data/x"])
def test_a_missing_local_dataset_path_is_no_such_file(spec, tmp_path):
    from easy_context.data import load_train_dataset

    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match=f"--dataset {re.escape(spec)}: no such file or folder; give an "):
        training.parse_config([*MODEL, "--dataset", spec, "--output-dir", str(out)])
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # the library's loader says the same
        load_train_dataset(spec, seq_length=8)


def _script_parser(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _eval_needle_parser():
    return _script_parser("eval_needle")


def _eval_ppl_parser():
    return _script_parser("eval_ppl")


def _advise_parser():
    from easy_context.advise import build_parser

    return build_parser()


def _prepare_data_parser():
    from easy_context.data import build_parser

    return build_parser()


# (script, its parser, flags --help must not list, a command line in the seed's spellings that must still parse,
# and what it parses to)
HELP_CASES = [
    ("train.py", training.build_parser, ["--stop-after-steps", "--parallel-mode"],
     ["--parallel_mode", "data_parallel", "--model_config", "tiny-llama", "--init_random", "--output_dir", "o",
      "--stop_after_steps", "1", "--seq_length", "64"], {"output_dir": "o", "seq_algo": "data_parallel"}),
    ("eval_needle.py", _eval_needle_parser, ["--parallel-mode"],
     ["--model", "m", "--parallel_mode", "ulysses_attn", "--output_dir", "o", "--num_samples", "2"],
     {"output_dir": "o", "seq_algo": "ulysses_attn"}),
    ("eval_ppl.py", _eval_ppl_parser, ["--parallel-mode", "-m", "-d", "-s", "-f"],
     ["-m", "a", "--model", "b", "-d", "pg19", "-s", "x", "-f", "txt", "--parallel_mode", "ulysses_attn",
      "--output_file", "o.csv", "--min_tokens", "64", "--sliding_window", "32"],
     {"model": ["a", "b"], "dataset": "pg19", "subset": "x", "feature": "txt", "seq_algo": "ulysses_attn",
      "output_file": "o.csv", "min_tokens": 64, "sliding_window": 32}),
    ("prepare_data.py", _prepare_data_parser, [], None, None),
    ("advise", _advise_parser, [], None, None),
]


@pytest.mark.parametrize("script, build, hidden, seed_argv, parsed", HELP_CASES, ids=[c[0] for c in HELP_CASES])
def test_help_lists_each_flag_once_with_its_help_and_default(script, build, hidden, seed_argv, parsed, monkeypatch):
    import argparse

    monkeypatch.setenv("COLUMNS", "100")
    parser = build()
    text = parser.format_help()
    listed = re.findall(r"^  (-[-\w]+)", text, flags=re.M)  # each flag's invocation line, in order
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    assert listed == [a.option_strings[0] for a in shown], listed  # once each, under its first (dash) name
    assert not [name for name in listed if "_" in name] and not set(hidden) & set(listed)
    assert not [line for line in re.findall(r"^  -.*", text, flags=re.M) if ", -" in line and "--help" not in line]
    assert max(len(line) for line in text.splitlines()) <= 100, max(text.splitlines(), key=len)
    blocks = re.split(r"^  (?=-)", text.split("\noptions:\n", 1)[1], flags=re.M)[1:]
    for action, block in zip(shown, blocks, strict=True):
        assert action.help, f"{action.option_strings[0]} has no help"
        if not (action.nargs == 0 or action.required or action.default is None or action.default is False):
            assert "default" in block, block  # the default is shown
    if seed_argv:  # the seed's --under_score spellings (and hidden flags) still work
        args = vars(parser.parse_args(seed_argv))
        assert {k: args[k] for k in parsed} == parsed


def test_13_report_to_wandb_without_wandb(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ValueError, match="pip install wandb.*--report-to none"):
        training.parse_config(["--model-config", "tiny-llama", "--init-random", "--report-to", "wandb",
                               "--output-dir", str(tmp_path)])


# ----------------------------------------------------------------------------- 7, 9: data
def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_7_a_labels_column_is_honoured(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 32), generator=g).tolist()
    plain = _jsonl(tmp_path / "plain.jsonl", [{"input_ids": r} for r in ids])
    same = _jsonl(tmp_path / "same.jsonl", [{"input_ids": r, "labels": r} for r in ids])
    masked = _jsonl(tmp_path / "masked.jsonl", [{"input_ids": r, "labels": [-100] * 32} for r in ids])
    half = _jsonl(tmp_path / "half.jsonl", [{"input_ids": r, "labels": [-100] * 16 + r[16:]} for r in ids])
    run = {name: _train(*TINY, "--dataset", data, "--output-dir", str(tmp_path / name))["losses"][1]
           for name, data in (("plain", plain), ("same", same), ("half", half))}
    assert run["same"] == run["plain"]  # labels equal to the inputs: the same targets
    assert run["half"] != run["plain"]  # prompt tokens masked: another token mean
    with pytest.warns(UserWarning, match="no target token in the whole batch"):  # every label masked: no loss
        _train(*TINY, "--dataset", masked, "--output-dir", str(tmp_path / "masked"))


def test_9_token_ids_outside_the_vocabulary_name_the_mismatch(tmp_path):
    data = _jsonl(tmp_path / "big.jsonl", [{"input_ids": [1] * 31 + [300]}, {"input_ids": [2] * 32}])
    with pytest.raises(ValueError, match="token id 300 is outside the model's vocabulary .vocab_size=256"):
        _train(*TINY, "--dataset", data, "--output-dir", str(tmp_path / "o"), "--batch-size", "2")


def test_empty_dataset_is_an_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        _train(*TINY, "--dataset", str(data), "--output-dir", str(tmp_path / "o"))


# ----------------------------------------------------------------------------- 10, 11, 16: launching
def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_10_plain_python_with_a_sequence_parallel_algorithm(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *MODEL, "--seq-algo", "zigzag_ring_attn",
                           "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--seq-algo data_parallel" in proc.stderr and "accelerate launch" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_11_a_flag_error_under_accelerate_launch_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port", _port(),
           os.path.join(ROOT, "train.py"), *MODEL, "--seq-algo", "zigzag_ring_attn", "--sp-size", "3",
           "--output-dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("train.py: error: --sp-size 3 must divide the number of processes 2") == 1, out[-3000:]
    assert "Traceback" not in out.split("train.py: error")[0]  # no worker traceback before the message


def test_11b_heads_the_algorithm_cannot_split_fail_before_loading(tmp_path):
    from easy_context.attention.registry import check_heads

    with pytest.raises(ValueError, match="3 query heads are not divisible by the Ulysses degree 2"):
        check_heads("ulysses_attn", 3, 3, 2)
    check_heads("zigzag_ring_attn", 3, 3, 2)  # a ring takes any head count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_16_workers_end_when_the_launcher_is_killed(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port", _port(),
           os.path.join(ROOT, "train.py"), *MODEL, "--max-train-steps", "100000", "--seq-algo", "zigzag_ring_attn",
           "--output-dir", str(out)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.time() + 150
        while not (out / training.LOG_FILE).exists() and time.time() < deadline:  # training has started
            time.sleep(0.5)
        assert (out / training.LOG_FILE).exists(), "training did not start"
        workers = _descendants(launcher.pid)
        assert workers, "no worker processes found"
        os.kill(launcher.pid, signal.SIGKILL)  # only the launcher
        launcher.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_alive(p) for p in workers), "workers outlived their launcher"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- 14: eval_ppl short documents
def test_14_perplexity_skips_lengths_no_document_fills(tmp_path):
    from transformers import AutoModelForCausalLM

    from easy_context.eval.ppl import evaluate_perplexity
    from easy_context.eval.tiny import save_tiny_model

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(str(tmp_path / "tiny"))).eval()
    docs = [list(range(2, 40)), list(range(2, 80))]
    with pytest.warns(UserWarning, match="1 of 2 documents have fewer than 64 tokens"):
        ppl = evaluate_perplexity(model, docs, [32, 64, 128], truncate=True, progress=False)
    assert ppl[0] == ppl[0] and ppl[1] == ppl[1] and ppl[1] != ppl[0]
    assert ppl[2] != ppl[2]  # NaN: no document has 128 tokens
