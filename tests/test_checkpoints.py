"""easy_context/training/checkpoints.py (and the loop's failure handling): resumes that retire the abandoned
checkpoints, content hashes with fallback, recorded settings, a torn log, a full disk, non-finite gradient norms.

Every training here is one in-process data_parallel run of tiny-llama (no process start, ~0.2 s a step); one base run
of 4 steps with a checkpoint after each is copied for each case. The reference of every resumed loss is that
uninterrupted base run (same data order, same operations: equal to the last bit in practice, RTOL as in test_train).
"""
import errno
import json
import os
import re
import shutil

import pytest
import torch
from test_train import RTOL, _argv, _train

from easy_context import training
from easy_context.training import checkpoints

STEPS = 4


def _run(out, *extra, steps=STEPS):
    return _train(_argv(out, "data_parallel", "--checkpointing-steps", "1", "--no-save-model", *extra, steps=steps))


def _ckpts(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def _step(out, k):
    return os.path.join(out, "checkpoints", f"step_{k}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster for these tiny shapes
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The uninterrupted 4-step run (a checkpoint after every step): its folder and losses."""
    out = str(tmp_path_factory.mktemp("ckpt") / "base")
    return out, _run(out)["losses"]


def _copy(base, tmp_path, name):
    out = str(tmp_path / name)
    shutil.copytree(base[0], out)
    return out


def _close(got: dict, base_losses: dict, what):
    assert got and all(abs(got[s] - base_losses[s]) <= RTOL * abs(base_losses[s]) for s in got), (what, got)


# ----------------------------------------------------------------------------- item 2: a resume retires later ones
def test_resume_by_name_retires_later_checkpoints(base, tmp_path, capsys):
    """Resume step_2 by name and stop at 3, then `latest`: it continues the new chain (step_3, then 4), not the
    abandoned run's step_4; the abandoned checkpoints are kept under names `latest` never picks, and it is said."""
    out = _copy(base, tmp_path, "run")
    table = [  # (resume from, stop after, resumed at, retired steps this time, active checkpoints after)
        (_step(out, 2), 3, 2, [3, 4], ["step_1", "step_2", "step_3"]),
        ("latest", None, 3, [], ["step_1", "step_2", "step_3", "step_4"]),
        (_step(out, 1), 2, 1, [2, 3, 4], ["step_1", "step_2"]),  # retired twice within a second: names stay distinct
    ]
    retired_total = 0
    for resume, stop, at, retired, active in table:
        capsys.readouterr()
        extra = ("--resume-from-checkpoint", resume) + (("--stop-after-steps", str(stop)) if stop else ())
        got = _run(out, *extra)["losses"]
        said = capsys.readouterr().out
        assert f"resumed from {_step(out, at) if resume == 'latest' else resume} at step {at}" in said
        assert sorted(got) == list(range(at + 1, (stop or STEPS) + 1)), (resume, got)
        _close(got, base[1], f"resumed from {resume}")
        names = _ckpts(out)
        assert [n for n in names if ".retired-" not in n] == active, names
        assert f"retired the {len(retired)} later checkpoint" in said if retired else "retired" not in said
        retired_total += len(retired)
        assert len([n for n in names if ".retired-" in n]) == retired_total, names
    with open(os.path.join(out, training.LOG_FILE)) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # the log follows the resumed chain


# ----------------------------------------------------------------------------- item 3: content hashes
def _zero_exponents(path, n=64):
    """Zero the exponent byte of n float32 weights past the safetensors header (a silent change before hashes)."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        for i in range(n):
            f.seek(8 + header + 4 * i + 3)
            f.write(b"\x00")


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


DAMAGES = {  # name: (damage the newest checkpoint, what the problem says)
    "64 weights' exponents": (lambda p: _zero_exponents(os.path.join(p, "model.safetensors")), "model.safetensors does "
                              "not match its sha256"),
    "16 bytes of optimizer.bin": (lambda p: _overwrite(os.path.join(p, "optimizer.bin"), 4096, b"\x00" * 16),
                                  "optimizer.bin does not match its sha256"),
    "safetensors header": (lambda p: _overwrite(os.path.join(p, "model.safetensors"), 0, b"\xff" * 8),
                           "model.safetensors: header length"),
    "a missing file": (lambda p: os.remove(os.path.join(p, "random_states_0.pkl")), "random_states_0.pkl is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_falls_back_under_latest_and_is_refused_by_name(base, tmp_path, damage):
    out = _copy(base, tmp_path, "run")
    hurt, problem = DAMAGES[damage]
    hurt(_step(out, 4))
    with pytest.raises(ValueError, match=f"--resume-from-checkpoint {_step(out, 4)}: the checkpoint is damaged or "
                                         f"incomplete: {problem}"):
        _run(out, "--resume-from-checkpoint", _step(out, 4))
    with pytest.warns(UserWarning, match=f"skipping damaged or incomplete checkpoint {_step(out, 4)}: {problem}"):
        got = _run(out, "--resume-from-checkpoint", "latest")["losses"]
    assert sorted(got) == [4]
    _close(got, base[1], f"fallback after {damage}")  # the previous good checkpoint, continued exactly
    assert any(n.startswith("step_4.retired-") for n in _ckpts(out))  # the damaged one is kept for inspection


def test_hashing_streams_in_chunks(tmp_path):
    """The recorded sha256 is hashlib's of the whole file, read in chunks (the independent reference: one read)."""
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom(checkpoints.HASH_CHUNK * 2 + 12345)
    path.write_bytes(data)
    assert checkpoints._sha256(str(path)) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- item 4: recorded settings
REFUSED = [  # (changed flags, the setting the error lists as "old -> new")
    (("--seed", "8"), "--seed: 7 -> 8"),
    (("--seq-length", "32"), "--seq-length: 64 -> 32"),
    (("--gradient-accumulate-every", "1"), "--gradient-accumulate-every: 2 -> 1"),
    (("--lr-schedule", "cosine"), "--lr-schedule: constant -> cosine"),
    (("--learning-rate", "1e-3"), "--learning-rate: 0.003 -> 0.001"),
    (("--batch-size", "2"), "rows per micro-batch (--batch-size x data-parallel replicas): 1 -> 2"),
    (("--warmup-steps", "1"), "--warmup-steps: 0 -> 1"),
    (("--max-grad-norm", "0.5"), "--max-grad-norm: 1.0 -> 0.5"),
    (("--dtype", "bfloat16"), "--dtype: float32 -> bfloat16"),
]
ALLOWED = ("--packing", "none",  # synthetic rows have no position_ids: the same training
           "--loss-chunk-size", "16", "--gradient-checkpointing", "--tiled-mlp", "--low-memory-rmsnorm",
           "--attn-backend", "math", "--checkpoints-total-limit", "9", "--max-nonfinite-steps", "5",
           "--collective-timeout", "60")


def test_resume_refuses_changed_settings_and_allows_exact_changes(base, tmp_path):
    """Each result-changing flag is refused, naming old -> new and the fix, before the model is built; changes proven
    exact (memory features, kernels, bookkeeping) resume the same curve. (World size and algorithm: test_train.)"""
    out = _copy(base, tmp_path, "run")
    for flags, listed in REFUSED:
        with pytest.raises(ValueError) as e:
            _run(out, "--resume-from-checkpoint", _step(out, 2), *flags)
        msg = str(e.value)
        assert f"--resume-from-checkpoint {_step(out, 2)} was written with other settings" in msg
        assert listed in msg and "--overwrite-output-dir" in msg and "restore the flag" in msg, msg
    from easy_context.data import synthetic_dataset

    vocab = training.load_config("tiny-llama").vocab_size
    for seed in (7, 8):  # the base run's 8 synthetic rows, and other rows, as dataset folders
        synthetic_dataset(8, 64, vocab, seed=seed).save_to_disk(str(tmp_path / f"data{seed}"))
    with pytest.raises(ValueError, match=r"data \(--dataset; fingerprint\): synthetic \[\w+\] -> "
                                         f"{tmp_path / 'data8'}"):
        _run(out, "--resume-from-checkpoint", _step(out, 2), "--dataset", str(tmp_path / "data8"))
    # the same rows under another path, and changes proven exact: the same curve
    got = _run(out, "--resume-from-checkpoint", _step(out, 2), "--dataset", str(tmp_path / "data7"), *ALLOWED)
    _close(got["losses"], base[1], "resumed with exact changes")
    assert sorted(got["losses"]) == [3, 4]


# ----------------------------------------------------------------------------- item 6: torn log, full disk, fsync
def _torn_last(log):
    with open(log, "a") as f:
        f.write('{"step": 5, "lo')


def _torn_middle(log):
    with open(log) as f:
        lines = f.readlines()
    with open(log, "w") as f:
        f.writelines([lines[0], '{"step": 2, "lo\n', *lines[2:]])


def _failing_save(exc):
    real = torch.save

    def save(obj, f, *a, **k):  # a disk that fills up during the step-2 checkpoint, after some bytes are written
        if "step_2.tmp" in str(f):
            with open(f, "wb") as g:
                g.write(b"\x00" * 100)
            raise exc
        return real(obj, f, *a, **k)
    return save


FULL_DISK = {
    "torch.save RuntimeError": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 0"),
    "OSError ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
}


def test_torn_log_and_full_disk(base, tmp_path, monkeypatch):
    out = _copy(base, tmp_path, "torn")
    log = os.path.join(out, training.LOG_FILE)
    _torn_middle(log)
    with pytest.raises(ValueError, match=f"{log} line 2 is not a log record .* repair or delete that line"):
        _run(out, "--resume-from-checkpoint", "latest")
    shutil.rmtree(out)
    out = _copy(base, tmp_path, "torn")
    _torn_last(log)
    with pytest.warns(UserWarning, match=f"{log}: dropping its torn last line 5"):
        got = _run(out, "--resume-from-checkpoint", _step(out, 3))["losses"]
    _close(got, base[1], "resumed over a torn log")
    with open(log) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]

    for name, exc in FULL_DISK.items():
        run = str(tmp_path / name.replace(" ", "_"))
        with monkeypatch.context() as m:
            m.setattr(torch, "save", _failing_save(exc))
            with pytest.raises(checkpoints.CheckpointWriteError, match="free space and resume with "
                                                                      "--resume-from-checkpoint latest"):
                _run(run, steps=2)
        assert _ckpts(run) == ["step_1"], name  # the partial step_2.tmp is gone
        assert checkpoints.checkpoint_problem(_step(run, 1)) is None


def test_checkpoint_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    """Every data file, the state file, the checkpoint folder and its parent (after the rename) reach os.fsync."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = str(tmp_path / "run")
    _run(out, steps=1)
    step = _step(out, 1)
    want = {os.path.join(step, n) for n in os.listdir(step)} | {step, os.path.dirname(step)}
    got = {p.replace(step + ".tmp", step) for p in synced}
    assert want <= got, sorted(want - got)


# ----------------------------------------------------------------------------- item 7: non-finite gradient norms
HOOKED = "model.layers.1.self_attn.o_proj.weight"


def _poison(monkeypatch, bad_steps, ga=2):
    """Make the gradient of HOOKED infinite in the optimizer steps ``bad_steps`` (a grad hook on that parameter)."""
    from easy_context.training import loop

    real = loop.apply_memory_features

    def apply(cfg, model):
        real(cfg, model)
        calls = [0]

        def hook(g):
            calls[0] += 1
            return g * float("inf") if (calls[0] - 1) // ga + 1 in bad_steps else g
        dict(model.named_parameters())[HOOKED].register_hook(hook)
    monkeypatch.setattr(loop, "apply_memory_features", apply)


NONFINITE = [  # (steps with an infinite gradient, --max-nonfinite-steps, steps 1..3 or the error's step span)
    ({2}, 3, None),
    ({1, 2, 3}, 3, "steps 1-3"),
    ({2, 3}, 2, "steps 2-3"),
    ({1, 3}, 2, None),  # not consecutive
]


def test_nonfinite_gradient_norm_skips_the_update_and_stops_after_n(tmp_path, monkeypatch):
    def strict(text):  # json.loads accepts Infinity/NaN; standard JSON does not
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    clean = _train(_argv(tmp_path / "clean", "data_parallel", "--no-save-model"))["model"]
    for i, (bad, limit, error) in enumerate(NONFINITE):
        out = tmp_path / f"case{i}"
        with monkeypatch.context() as m:
            _poison(m, bad)
            argv = _argv(out, "data_parallel", "--no-save-model", "--max-nonfinite-steps", str(limit))
            if error:
                with pytest.raises(FloatingPointError, match=f"{error}: .*updates were skipped. First non-finite "
                                                             f"parameter: {re.escape(HOOKED)} \\(gradient\\)"):
                    _train(argv)
            else:
                result = _train(argv)
        with open(out / training.LOG_FILE) as f:
            log = [strict(line) for line in f]
        assert [r["step"] for r in log if r.get("nonfinite")] == sorted(s for s in bad if s <= len(log)), log
        assert all(r["grad_norm"] is None for r in log if r.get("nonfinite"))
        if not error:  # the skipped steps changed nothing: other updates only. Reference: a run with bad steps' lr 0
            assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    # an update skipped at the last step leaves the model of the step before: compare with a clean 2-step model
    with monkeypatch.context() as m:
        _poison(m, {3})
        skipped = _train(_argv(tmp_path / "last", "data_parallel", "--no-save-model"))["model"]
    two = _train(_argv(tmp_path / "two", "data_parallel", "--no-save-model", "--stop-after-steps", "2"))["model"]
    diff = max((a - b).abs().max().item() for a, b in zip(skipped.parameters(), two.parameters()))
    assert diff == 0.0, diff
    assert max((a - b).abs().max().item() for a, b in zip(clean.parameters(), two.parameters())) > 0  # tells apart
