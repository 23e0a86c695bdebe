"""The bench scripts that can run without a GPU: bench/peers.py's CPU smoke mode (2 gloo processes, tiny shapes),
its verdicts, and bench/comm_model.py's two modes."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import comm_model  # noqa: E402 - bench/comm_model.py
import peers  # noqa: E402 - bench/peers.py
import torch  # noqa: E402


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_peers_cpu_smoke(tmp_path, record_property):
    """Both parts end to end on 2 gloo ranks (GQA 4/2 heads, bf16): easy_context's rows are there and right,
    the peers are measured or skipped with a reason, and the tables come out."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    run = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "attn", "step", "--cpu-smoke",
                          "--kv-heads", "2", "--seqs", "128", "--profile"],
                         env=env, capture_output=True, text=True, timeout=240)
    record_property("seconds", round(time.time() - t0, 1))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vs best peer" in run.stdout

    attn = [r for r in _rows(tmp_path / "peers_attn.jsonl") if r["kind"] == "attn"]
    by = {r["method"]: r for r in attn}
    assert set(by) == set(peers.ATTN_METHODS)
    for name in ("single", *peers.EC_ALGOS):
        r = by[name]
        assert r["check"] == "ok", r
        assert r["ms_fwd"] > 0 and r["ms_fwdbwd"] > 0
        # bf16 against the float64 reference: about one bf16 rounding, within 2x of one F.sdpa call's
        assert max(r["err"].values()) < 1e-2, r
        assert all(r["err"][n] <= 2 * r["yardstick"][n] for n in r["err"]), r
    for name in peers.TORCH_CP:  # torch context parallel has no CPU SDPA handler
        assert "CUDA" in by[name]["skipped"]
    ds = by["ds_ulysses"]
    assert ds.get("check") == "ok" or "skipped" in ds, ds
    assert by["ec_zigzag"]["eff_fwdbwd"] > 0  # measured against `single`
    # --profile: one profiled pass per method and rank (no CUDA kernels on the CPU: device time 0, wall time > 0)
    assert [p["kernels"] for p in by["ec_zigzag"]["profile_per_rank"]] == [0, 0]
    assert "attn ec_zigzag S=128 rank1" in (tmp_path / "profile_rank1.txt").read_text()

    step = _rows(tmp_path / "peers_step.jsonl")
    ref = [r for r in step if r["kind"] == "reference"]
    assert len(ref) == 1 and ref[0]["status"] == "ok", ref
    by = {r["method"]: r for r in step if r["kind"] == "step"}
    assert set(by) == set(peers.STEP_METHODS)
    for name in peers.EC_ALGOS:
        r = by[name]
        assert r["check"] == "ok", r
        assert r["loss_rel_diff"] <= peers.LOSS_RTOL and r["gnorm_rel_diff"] <= 2e-2, r
        assert r["tok_per_s"] > 0 and r["mfu"] >= 0
    assert by["ds_alst"].get("check") == "ok" or "skipped" in by["ds_alst"], by["ds_alst"]
    for name in peers.TORCH_CP:
        assert "CUDA" in by[name]["skipped"]


def test_profile_summary_counts_idle_and_hidden_time():
    """bench/_profile.py's arithmetic on made-up kernels: compute on two streams overlapping (union, not sum), an
    NCCL kernel half under compute, and a CPU op that is not a kernel."""
    from types import SimpleNamespace as NS

    import _profile

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, dev=cuda):  # microseconds
        return NS(name=name, device_type=dev, time_range=NS(start=start, end=end))

    events = [ev("gemm", 0, 4000), ev("flash_fwd", 3000, 6000), ev("ncclDevKernel_SendRecv", 5000, 7000),
              ev("aten::mm", 0, 10000, cpu)]
    s = _profile.kernel_summary(events, wall_ms=10.0)
    assert s == {"wall_ms": 10.0, "compute_ms": 6.0, "compute_share": 0.6, "nccl_ms": 2.0, "nccl_hidden_ms": 1.0,
                 "kernels": 3}


def test_attention_verdict_flags_errors_above_twice_the_yardstick():
    yard = {"out": 2e-3, "dq": 2.5e-3, "dk": 3e-3, "dv": 3e-3}
    ok, _ = peers.attn_verdict({"out": 3e-3, "dq": 4e-3, "dk": 5e-3, "dv": 6e-3}, yard, torch.bfloat16)
    assert ok
    ok, why = peers.attn_verdict({"out": 3e-3, "dq": 6e-3, "dk": 5e-3, "dv": 6e-3}, yard, torch.bfloat16)
    assert not ok and why.startswith("dq")
    ok, _ = peers.attn_verdict({"out": float("nan"), "dq": 0, "dk": 0, "dv": 0}, yard, torch.bfloat16)
    assert not ok
    tiny = {n: 1e-7 for n in yard}  # float32: the 1e-5 floor, not 2e-7
    assert peers.attn_verdict({n: 5e-6 for n in yard}, tiny, torch.float32)[0]
    assert not peers.attn_verdict({n: 5e-6 for n in yard}, tiny, torch.bfloat16)[0]


def test_step_verdict_and_best_peer():
    ref = {"loss": 10.0, "gnorm_q0": 1.0, "what": "single"}
    good = {"method": "ec_zigzag", "S": 8, "loss": 10.005, "gnorm_q0": 1.01, "tok_per_s": 100}
    fast_wrong = {"method": "ds_alst", "S": 8, "loss": 10.02, "gnorm_q0": 1.0, "tok_per_s": 500}
    slow_peer = {"method": "torch_cp_alltoall_cudnn", "S": 8, "loss": 10.0, "gnorm_q0": 1.05, "tok_per_s": 50}
    for r in (good, fast_wrong, slow_peer):
        peers.step_verdict(r, ref, gnorm_tol=2e-2)
    assert good["check"] == "ok"
    assert fast_wrong["check"] == "WRONG" and "loss" in fast_wrong["wrong"]
    assert slow_peer["check"] == "WRONG" and "gnorm" in slow_peer["wrong"]
    rows = [good, fast_wrong, slow_peer, dict(slow_peer, method="torch_cp_allgather_cudnn", check="ok")]
    assert peers.best_peer(rows, 8, "tok_per_s", higher=True) == 50  # the fast wrong peer does not count
    assert "| 2.00 |" in peers.step_table([dict(good, s_per_step=1, tflops_per_gpu=1, mfu=0.1)] + rows[1:])


def test_checked_heads_cover_whole_kv_groups():
    assert peers.checked_heads(32, 32, 4) == ([0, 8, 16, 24], [0, 8, 16, 24])
    assert peers.checked_heads(32, 8, 4) == ([0, 1, 2, 3], [0])
    assert peers.checked_heads(32, 8, 8) == ([0, 1, 2, 3, 16, 17, 18, 19], [0, 4])
    assert peers.checked_heads(4, 2, 4) == ([0, 1, 2, 3], [0, 1])


def test_comm_model_table_keeps_its_flat_link_mode():
    rows = json.load(open(os.path.join(BENCH, "results", "attention.json")))
    flat = comm_model.table(rows, comm_model.flat_link(450.0))
    assert "predicted eff. at 450 GB/s" in flat[0]
    # bench/RESULTS.md section 4 (the first model, 450 GB/s): zigzag 256K on 2 ranks, 2147 MB per forward step
    assert "| 256K | 32/32 | zigzag_ring_attn | 2 | 2147 | 243.00 | 9 | 6442 | 649.22 | 10 | 1.00 |" in flat
    assert "| 16K | 32/32 | zigzag_ring_attn | 8 | 34 | 0.35 | 96 | 101 | 0.10 | 986 | 0.79 |" in flat
    measured = comm_model.table(rows, comm_model.MACHINES["h200x2"])
    assert "| 16K | 32/32 | zigzag_ring_attn | 8 | 34 | 0.35 | 96 | 101 | 0.10 | 986 | 0.59 |" in measured


def test_comm_model_link_presets():
    link = comm_model.MACHINES[comm_model.DEFAULT_MACHINE]
    assert link.p2p_GBps(2 * 2**30) == pytest.approx(359.0) and link.a2a_GBps(2 * 2**30) == pytest.approx(330.0)
    assert link.p2p_GBps(2**40) == pytest.approx(359.0) and link.p2p_GBps(1) == pytest.approx(243.0)
    assert 345.0 < link.p2p_GBps(2**30) < 359.0  # log-interpolated between 512 MiB and 2 GiB


def test_comm_model_predicts_a_hidden_ring_at_256k(capsys):
    rows = json.load(open(os.path.join(BENCH, "results", "attention.json")))
    p = comm_model.predict_step(262144, 2, 32, False, comm_model.MACHINES["h200x2"], rows)
    ring = p["ring"]
    assert ring["kv_bytes"] == 2 * 131072 * 32 * 128 * 2
    (c0, t0), (c1, t1) = ring["fwd"]
    assert c0 == pytest.approx(0.243, rel=1e-3) and t1 == 0.0 and t0 < 0.05 * c0  # the K/V transfer hides under compute
    assert ring["exposed_fwd"] == 0.0
    assert ring["exposed_bwd"] == pytest.approx(ring["bwd"][-1][1])  # only the last dK/dV hop shows
    assert p["zigzag"]["exposed_comm"] < 0.01 * p["zigzag"]["step"]
    assert p["ulysses"]["exposed_comm"] > p["zigzag"]["exposed_comm"]
    comm_model.main(["--step", "--layers", "4"])
    out = capsys.readouterr().out
    assert "last dK/dV hop" in out and "predicted step s" in out and "--layers 4" in out


def test_sdpa_case_repeats_kv_when_the_backend_refuses_gqa(monkeypatch):
    """A backend that refuses enable_gqa (cuDNN in some torch versions) makes the case repeat K/V instead."""
    real = torch.nn.functional.scaled_dot_product_attention

    def no_gqa(*args, enable_gqa=False, **kwargs):
        if enable_gqa:
            raise RuntimeError("No available kernel")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_gqa)
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 4, 16, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2, 16, 8, generator=g).requires_grad_() for _ in range(2))
    q.requires_grad_()
    case = peers.sdpa_case(q, k, v, do, 0.3, "auto", lambda x: x)
    got = case.fwdbwd()
    assert case.info["gqa"] == "repeat" and "No available kernel" in case.info["gqa_refused"]
    ref = real(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    assert torch.allclose(got["out"], ref.transpose(1, 2)) and got["dk"].shape == (1, 16, 2, 8)


def test_peers_step_on_packed_rows_matches_the_per_document_reference(tmp_path):
    """``step --packed``: easy_context's steps on packed rows (documents balanced as train.py does) equal the one-GPU
    reference, which transformers masks per document from the restarting positions; the peers are skipped with the
    reason; the row reports its documents and counts only in-document attention."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "step", "--cpu-smoke", "--seqs", "128",
                          "--packed", "8:40", "--methods", "ec_zigzag", "ec_ulysses", "ds_alst"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    by = {r["method"]: r for r in _rows(tmp_path / "peers_step.jsonl") if r["kind"] == "step"}
    for name in ("ec_zigzag", "ec_ulysses"):
        r = by[name]
        assert r["check"] == "ok", r
        assert r["docs"] > 2 and 0 < r["attn_pairs_fraction"] < 1, r
    assert "--packed" in by["ds_alst"]["skipped"]


def test_detached_runs_outlive_their_starter_and_report_their_end(tmp_path):
    """bench/detached.sh (a step longer than one device call): start returns while the command runs, the
    arguments arrive as given (spaces kept), wait reports "still running" (exit 3) and then the command's own exit
    code; a second start under a running name is refused."""
    script = os.path.join(BENCH, "detached.sh")
    env = dict(os.environ, DETACHED_DIR=str(tmp_path))

    def sh(*args):
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)

    t0 = time.time()
    start = sh("start", "job", "--", sys.executable, "-c",
               "import sys, time; print(sys.argv[1:], flush=True); time.sleep(3); sys.exit(4)", "a b", "c")
    assert start.returncode == 0 and time.time() - t0 < 2.5, start  # did not wait for the 3-s command
    assert sh("start", "job", "--", "true").returncode == 2  # the name is taken while it runs
    running = sh("wait", "job", "0")
    assert running.returncode == 3 and "still running" in running.stdout, running
    done = sh("wait", "job", "30")
    assert done.returncode == 0 and "['a b', 'c']" in done.stdout and "job ended: exit 4" in done.stdout, done
    assert (tmp_path / "job.rc").read_text().strip() == "4"
    assert sh("wait", "other", "1").returncode == 2  # an unknown name is an error, not a wait


def test_window_attn_smoke_counts_the_skipped_blocks():
    """bench/window_attn.py --smoke (CPU, math kernel): it runs, and its zigzag ranks skip the blocks outside the
    window (4 ranks, a window within one chunk: ranks 0 and 3 skip 2 blocks, ranks 1 and 2 one)."""
    import window_attn  # noqa: PLC0415 - bench/window_attn.py

    rows = {r["what"]: r for r in window_attn.main(["--smoke"])}
    assert rows["ring_per_rank_windowed"]["skipped_blocks"] == [2, 1, 1, 2]
    assert rows["ring_per_rank_full_causal"]["skipped_blocks"] == [0]
    assert rows["summary"]["windowed_over_full_causal"] > 0
