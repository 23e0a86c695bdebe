"""train.py / easy_context/training/: every parallel mode trains to the same loss curve as one process, resume
reproduces the uninterrupted curve, the saved model reloads with the same logits, and a real `accelerate launch`.

Process starts dominate on a 2-core box: one 1-rank and one 2-rank gloo group run all in-process trainings (the
training loop is `training.main(argv)`, exactly what train.py calls), plus one `accelerate launch` subprocess.
"""
import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _dist import run_distributed

from easy_context import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_ALGOS = ("zigzag_ring_attn", "dist_flash_attn", "ulysses_attn", "usp_attn")
STEPS, GA, SEQ = 3, 2, 64

# fp32 everywhere. The modes differ only in summation order: ring/online-softmax merges, per-rank partial CE sums,
# gradient all-reduces (~1e-7 relative per op, ~1e-6 after two layers and backward, as in test_hf). Adam at
# lr 3e-3 over 3 steps turns gradient differences into weight differences of ~lr * (relative grad error) and
# the loss moves by less than 1e-6 relative (measured: <1e-7). 1e-4 keeps a wide margin, while a mis-scaled loss
# or gradient (e.g. a missing factor of the world size, or SP ranks seeing different data) changes the step-2
# loss by >1e-2.
RTOL = 1e-4
AUTOCAST_FLAGS = ("--dtype", "float32", "--mixed-precision", "bf16")  # float32 weights, bf16 autocast
MEMORY_FLAGS = ("--gradient-checkpointing", "--offload-checkpointing", "--attn-preserving-checkpointing", "--tiled-mlp",
                "--tiled-mlp-tile-size", "8", "--low-memory-rmsnorm", "--fused-kernels")


def _argv(out, mode, *extra, steps=STEPS, batch=1):
    return ["--parallel_mode", mode, "--model_config", "tiny-llama", "--init_random", "--dataset", "synthetic",
            "--seq-length", str(SEQ), "--max-train-steps", str(steps), "--batch-size", str(batch),
            "--gradient-accumulate-every", str(GA), "--learning-rate", "3e-3", "--seed", "7", "--attn-backend", "math",
            "--report-to", "none", "--output-dir", str(out), *extra]


def _train(argv):
    """Run train.py's loop in this process; reset accelerate's process-wide singletons so runs are independent."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return training.train(training.build_parser().parse_args(argv))


def _accelerate_env(rank, world):
    # the gloo group exists already (run_distributed); accelerate adopts it when the env describes it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")


def _losses(result):
    return [result["losses"][s] for s in sorted(result["losses"])]


def _one_rank_worker(rank, world, root):
    _accelerate_env(rank, world)
    return {
        "batch1": _losses(_train(_argv(f"{root}/w1_b1", "data_parallel", "--checkpointing-steps", "2"))),
        "batch2": _losses(_train(_argv(f"{root}/w1_b2", "data_parallel", batch=2))),
        "autocast": _losses(_train(_argv(f"{root}/w1_ac", "data_parallel", *AUTOCAST_FLAGS))),
    }


def _two_rank_worker(rank, world, root):
    _accelerate_env(rank, world)
    out = {}
    for algo in SP_ALGOS:
        out[algo] = _losses(_train(_argv(f"{root}/{algo}", algo, "--no-save-model")))
    out["usp_attn ring_degree=1"] = _losses(_train(_argv(f"{root}/usp_r1", "usp_attn", "--ring-degree", "1",
                                                         "--no-save-model")))
    out["zigzag + memory features"] = _losses(_train(_argv(f"{root}/mem", "zigzag_ring_attn", *MEMORY_FLAGS,
                                                           "--no-save-model")))
    out["zigzag autocast"] = _losses(_train(_argv(f"{root}/ac", "zigzag_ring_attn", *AUTOCAST_FLAGS,
                                                  "--no-save-model")))
    out["data_parallel"] = _losses(_train(_argv(f"{root}/dp", "data_parallel", "--no-save-model")))
    out["zigzag sp_size=1"] = _losses(_train(_argv(f"{root}/sp1", "zigzag_ring_attn", "--sp-size", "1",
                                                   "--no-save-model")))

    # resume: an uninterrupted 4-step run vs. a run "killed" after its step-2 checkpoint, then resumed
    full = _train(_argv(f"{root}/full", "zigzag_ring_attn", "--checkpointing-steps", "2", steps=4))
    killed = _train(_argv(f"{root}/killed", "zigzag_ring_attn", "--checkpointing-steps", "2",
                          "--stop-after-steps", "2", steps=4))
    out["killed_saved_model"] = os.path.exists(f"{root}/killed/config.json")
    resumed = _train(_argv(f"{root}/killed", "zigzag_ring_attn", "--checkpointing-steps", "2",
                           "--resume-from-checkpoint", "latest", steps=4))
    out["full"], out["killed"], out["resumed"] = full["losses"], killed["losses"], resumed["losses"]
    with open(f"{root}/killed/{training.LOG_FILE}") as f:
        out["resumed_log"] = [json.loads(line)["loss"] for line in f]
    out["resume changes"] = _resume_changes(rank, root)

    # the saved model (rank 0 wrote it) reloads with plain sdpa attention and gives the trained model's logits
    torch.distributed.barrier()
    from transformers import AutoModelForCausalLM

    trained = copy.deepcopy(full["model"])
    trained.set_attn_implementation("sdpa")
    reloaded = AutoModelForCausalLM.from_pretrained(f"{root}/full")
    ids = torch.randint(0, trained.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out["logits_diff"] = (trained(ids).logits - reloaded(ids).logits).abs().max().item()
    out["reloaded_attn"] = reloaded.config._attn_implementation
    return out


# a checkpoint's step-2 state resumed with other processes or another algorithm: (name, run that wrote it, --seq-algo,
# the error it must raise, None: allowed). What matters is the rows of each micro-batch (checkpoints.run_settings).
RESUME_CHANGES = [
    ("another SP algorithm", "full", "ulysses_attn", None),
    ("2 ranks resume 1 process's run", "w1_b1", "zigzag_ring_attn", None),
    ("data_parallel: 2 replicas of 1 row", "full", "data_parallel",
     "rows per micro-batch (--batch-size x data-parallel replicas): 1 -> 2"),
]


def _resume_changes(rank, root):
    import shutil

    got = {}
    for name, source, algo, _ in RESUME_CHANGES:
        out = f"{root}/changed_{source}_{algo}"
        if rank == 0:
            shutil.copytree(f"{root}/{source}", out)
        torch.distributed.barrier()
        try:
            got[name] = _losses(_train(_argv(out, algo, "--resume-from-checkpoint", f"{out}/checkpoints/step_2",
                                             "--no-save-model", steps=4 if source == "full" else STEPS)))
        except ValueError as e:
            got[name] = str(e)
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    one = run_distributed(_one_rank_worker, 1, str(root), timeout=200)[0]
    two = run_distributed(_two_rank_worker, 2, str(root), timeout=300)
    return one, two


def _close_within(actual, expected, rtol, what):
    a, e = torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{what}: {len(actual)} steps vs {len(expected)}"
    err = ((a - e).abs() / e.abs()).max().item()
    assert err <= rtol, f"{what}: losses {actual} vs {expected} (max rel err {err:.2e})"


def _close(actual, expected, what):
    _close_within(actual, expected, RTOL, what)


def test_loss_falls(runs):
    one, _ = runs
    ref = one["batch1"]
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.05, ref


@pytest.mark.parametrize("mode", [*SP_ALGOS, "usp_attn ring_degree=1", "zigzag + memory features"])
def test_sequence_parallel_modes_match_one_process(runs, mode):
    one, two = runs
    assert two[0][mode] == two[1][mode]  # the logged global loss is the same number on every rank
    _close(two[0][mode], one["batch1"], mode)


def test_sequence_parallel_under_autocast_matches_one_process(runs):
    """float32 weights under bf16 autocast hand attention float32 q/k and a bf16 v (it once refused them)."""
    one, two = runs
    got, want = two[0]["zigzag autocast"], one["autocast"]
    # bf16 matmuls (2**-8 relative per rounding) on both sides, in other orders; the loss averages 128 tokens' errors
    # (measured 7e-6..3e-5). 1e-3 keeps a margin; refused inputs raise, a mis-scaled loss moves it by >1e-2
    _close_within(got, want, 1e-3, "zigzag autocast")
    assert want != one["batch1"]  # autocast really ran: bf16 matmuls move the loss off the float32 curve


@pytest.mark.parametrize("mode", ["data_parallel", "zigzag sp_size=1"])
def test_data_parallel_replicas_match_one_process_with_both_batches(runs, mode):
    # 2 replicas x 1 sequence see rows (2i, 2i+1) of the same permutation as 1 process with batch 2
    one, two = runs
    _close(two[0][mode], one["batch2"], mode)


def test_resume_reproduces_the_uninterrupted_run(runs):
    _, two = runs
    full, killed, resumed = two[0]["full"], two[0]["killed"], two[0]["resumed"]
    assert sorted(killed) == [1, 2] and sorted(resumed) == [3, 4]
    assert not two[0]["killed_saved_model"]
    # same process count, same order of operations: the resumed curve is the uninterrupted one (tiny slack for
    # reloaded optimizer state round-trips, which are exact in practice)
    _close([killed[1], killed[2], resumed[3], resumed[4]], [full[s] for s in (1, 2, 3, 4)], "resumed run")
    _close(two[0]["resumed_log"], [full[s] for s in (1, 2, 3, 4)], "train_log.jsonl of the resumed run")


def test_resume_across_world_sizes_and_algorithms(runs):
    """Changes proven exact resume the uninterrupted curve (another SP algorithm; 2 ranks continuing a 1-process
    run, one sequence over both); a change of the rows per micro-batch is refused, naming it, on every rank."""
    one, two = runs
    reference = {"full": two[0]["full"], "w1_b1": dict(enumerate(one["batch1"], 1))}
    for name, source, _, error in RESUME_CHANGES:
        got = two[0]["resume changes"][name]
        assert got == two[1]["resume changes"][name], name  # the ranks agree
        if error:
            assert isinstance(got, str) and error in got and "--overwrite-output-dir" in got, (name, got)
        else:
            steps = sorted(reference[source])[2:]
            _close(got, [reference[source][s] for s in steps], name)


def test_saved_model_reloads_with_same_logits(runs):
    _, two = runs
    assert two[0]["reloaded_attn"] == "sdpa"
    assert two[0]["logits_diff"] <= 1e-5, two[0]["logits_diff"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(runs, tmp_path):
    """The real CLI: `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train.py ...`."""
    one, _ = runs
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
           os.path.join(ROOT, "train.py"), *_argv(out, "ulysses_attn")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / training.LOG_FILE) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # written once (main process), every step
    _close([r["loss"] for r in log], one["batch1"], "accelerate launch ulysses_attn")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def _stuck_rank_worker(rank, world, port, out, results):
    """One rank of a 2-process run whose group accelerate creates (so --collective-timeout reaches it)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        _train(_argv(out, "zigzag_ring_attn", "--collective-timeout", "3", "--no-save-model", steps=2000))
        results.put((rank, "finished"))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(e).__name__}: {e}"))


def test_stuck_rank_fails_the_others_within_the_collective_timeout(tmp_path):
    """A rank stopped mid-run (SIGSTOP): with --collective-timeout 3 the other fails within seconds (the timeout plus
    the roll call) with an error naming the stopped rank and the flag, instead of hanging (gloo's default: 30 min)."""
    import multiprocessing as mp
    import signal
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    out = tmp_path / "stuck"
    port = _free_port()
    procs = [ctx.Process(target=_stuck_rank_worker, args=(r, 2, port, out, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        log, deadline = out / training.LOG_FILE, time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # both ranks are training
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "the run did not start"
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        rank, message = results.get(timeout=30)
        took = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert rank == 0 and message.startswith("CollectiveTimeout: rank 0: a collective waited longer than "
                                            "--collective-timeout 3 s: rank(s) 1 of 2 did not arrive"), message
    assert took < 15, took  # 3 s timeout + up to 3 s roll call; hanging would be 30 min


def _deepspeed_launch(out, nproc, *argv):
    """``accelerate launch --config_file accelerate_configs/single_node.yaml --num_processes nproc train.py ...``
    on CPU (DS_ACCELERATOR=cpu); the logged losses."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", "single_node.yaml"), "--num_processes", str(nproc),
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "train.py"), *_argv(out, *argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(DeepSpeed engine" in proc.stdout + proc.stderr  # really DeepSpeed, not accelerate's DDP fallback
    with open(out / training.LOG_FILE) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def deepspeed_one(tmp_path_factory):
    """One DeepSpeed process: the reference of the ZeRO-3 launches. Under a ZeRO-3 launch transformers builds the
    random model inside deepspeed.zero.Init (other initial weights than a plain process), the same for any number of
    processes."""
    return _deepspeed_launch(tmp_path_factory.mktemp("zero3_one"), 1, "data_parallel", "--no-save-model")


def test_deepspeed_zero3_launch_matches_one_process(deepspeed_one, tmp_path):
    """The shipped ZeRO-3 config (parameters and optimizer offloaded, DeepSpeed's CPU Adam) on 2 CPU processes,
    every memory feature on (tiled MLP and the low-memory RMSNorm with partitioned parameters): the same losses as
    one DeepSpeed process, and a saved model gathered from the partitions."""
    out = tmp_path / "zero3"
    _close(_deepspeed_launch(out, 2, "zigzag_ring_attn", *MEMORY_FLAGS), deepspeed_one,
           "DeepSpeed ZeRO-3 zigzag_ring_attn")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # whole weights, not ZeRO partitions
    assert sum(p.numel() for p in reloaded.parameters()) > 0 and all(p.numel() for p in reloaded.parameters())


def test_two_node_config_as_two_local_nodes(deepspeed_one, tmp_path):
    """accelerate_configs/two_node.yaml as shipped (ZeRO-3, c10d rendezvous, standard multi-node launcher), run as
    two "nodes" of one CPU process each on this machine: both launchers meet, and the losses are one process's."""
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    procs = []
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "accelerate_configs", "two_node.yaml"), "--num_processes", "2", "--machine_rank",
               str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               os.path.join(ROOT, "train.py"),
               *_argv(tmp_path / f"node{machine}", "zigzag_ring_attn", "--no-save-model")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-3000:]
    finally:  # one launcher failing leaves the other waiting at the rendezvous
        for p in procs:
            p.kill()
    with open(tmp_path / "node0" / training.LOG_FILE) as f:
        log = [json.loads(line) for line in f]
    _close([r["loss"] for r in log], deepspeed_one, "two_node.yaml on two local 'nodes'")


# ----------------------------------------------------------------------------- no processes


def test_validation_names_the_flag():
    parse = training.build_parser().parse_args
    with pytest.raises(ValueError, match="--init-random"):
        training.validate_args(parse(["--model_config", "tiny-llama", "--output-dir", "x"]), 1)
    with pytest.raises(ValueError, match="--sp-size"):
        training.validate_args(parse(["--model_config", "tiny-llama", "--init_random", "--sp-size", "3",
                                      "--output-dir", "x"]), 4)
    with pytest.raises(ValueError, match="--ring-degree"):
        training.validate_args(parse(["--model_config", "tiny-llama", "--init_random", "--ring-degree", "2",
                                      "--output-dir", "x"]), 4)


def test_rope_theta_and_builtin_config():
    args = training.build_parser().parse_args(["--model_config", "tiny-llama", "--init_random", "--rope-theta",
                                               "5e6", "--seq-length", "8192", "--output-dir", "x"])
    config = training.config_for(training.from_namespace(args))
    assert config.rope_parameters["rope_theta"] == 5e6 and config.max_position_embeddings == 8192


def _yaml_sets(cfg_dir, name, key):
    with open(os.path.join(cfg_dir, name)) as f:
        return any(line.startswith(f"{key}:") for line in f)


def test_accelerate_and_deepspeed_configs():
    """The shipped configs parse; the ZeRO-3 JSON leaves lr/schedule to the flags (no hidden values)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg_dir = os.path.join(ROOT, "accelerate_configs")
    for name in os.listdir(cfg_dir):
        if name.endswith(".yaml"):
            cfg = load_config_from_file(os.path.join(cfg_dir, name))
            # accelerate refuses to start when a yaml sets mixed_precision next to a deepspeed_config_file
            ds = getattr(cfg, "deepspeed_config", None) or {}
            assert not (ds.get("deepspeed_config_file") and _yaml_sets(cfg_dir, name, "mixed_precision")), name
    with open(os.path.join(cfg_dir, "zero3_offload.json")) as f:
        ds = json.load(f)
    assert "scheduler" not in ds and ds["optimizer"]["params"]["lr"] == "auto"
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    training.fill_auto(ds, {"optimizer.params.betas": [0.9, 0.95], "train_micro_batch_size_per_gpu": 1})
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["train_micro_batch_size_per_gpu"] == 1


def test_deepspeed_on_cuda_defaults_to_bf16():
    """accelerate launch exports ACCELERATE_MIXED_PRECISION=no for the shipped DeepSpeed yamls (which may not set
    it): the engine then ran in float32 and cuDNN gave NaN. Under DeepSpeed on CUDA that means bf16 unless the
    train.py flag says otherwise; elsewhere the launcher's choice stands."""
    r = training.resolve_mixed_precision
    assert r(None, "no", deepspeed=True, cuda=True) == "bf16"
    assert r(None, None, deepspeed=True, cuda=True) == "bf16"
    assert r("no", "no", deepspeed=True, cuda=True) == "no"  # float32 on purpose
    assert r(None, "fp16", deepspeed=True, cuda=True) == "fp16"
    assert r(None, "no", deepspeed=True, cuda=False) == "no"
    assert r(None, "no", deepspeed=False, cuda=True) == "no"
    assert r(None, "bf16", deepspeed=False, cuda=True) == "bf16"



def test_offloaded_optimizer_gets_the_node_cores():
    """Launchers export OMP_NUM_THREADS=1 on GPUs, and DeepSpeed's CPU Adam is an OpenMP loop: on 2xH200 it ran on
    one core per rank (9.9 s of an 84 s step). With the optimizer offloaded, each process gets its share of the
    node's cores; a user's OMP_NUM_THREADS above 1, or an optimizer on the GPU, is left alone."""
    f = training.host_optimizer_threads
    off = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert f(off, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=32) == 16
    assert f(off, {"LOCAL_WORLD_SIZE": "8"}, cores=128) == 16
    assert f(off, {"OMP_NUM_THREADS": "4", "LOCAL_WORLD_SIZE": "2"}, cores=32) is None  # the user's choice
    assert f(off, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=2) is None  # one core each anyway
    assert f({"zero_optimization": {"stage": 3}}, {"OMP_NUM_THREADS": "1"}, cores=32) is None
    assert f({"zero_optimization": {"offload_optimizer": {"device": "none"}}}, {}, cores=32) is None
    shipped = json.load(open(os.path.join(os.path.dirname(__file__), "..", "accelerate_configs", "zero3_offload.json")))
    assert f(shipped, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=32) == 16

# ----------------------------------------------------------------------------- packed documents (--packing)
# Rows of several documents whose position_ids restart at 0 (prepare_data.py --packing documents / --sft). Under
# data_parallel the decoder is transformers' own: called without cache or attention_mask, it reads the restarts as
# packed sequences and masks attention between documents (sdpa and eager). References: each document through the
# plain model on its own. fp32, the same ops in another grouping: ~1e-7 relative. Attention across documents or a
# target across a boundary moves even a random model's loss (~ln 256, whatever the context) by ~3e-3 relative,
# more than 100 x the tolerance: the assertions marked "tells apart" check that the reference sees the difference.
PACK_SEQ, PACK_TOL = 32, 1e-5


def _packed_rows(n_rows, seed=0, vocab=256, with_labels=True):
    """Rows of tiny-llama-sized ids packed by easy_context.data (documents of 1..20 tokens, some split across rows),
    with SFT-like labels (-100 on about a third of the tokens)."""
    from easy_context.data import pack_documents_with_positions

    gen = torch.Generator().manual_seed(seed)
    docs = []
    while sum(len(d["tokens"]) for d in docs) < n_rows * PACK_SEQ:
        tokens = torch.randint(3, vocab, (int(torch.randint(1, 21, (1,), generator=gen)),), generator=gen)
        labels = torch.where(torch.rand(len(tokens), generator=gen) < 0.3, -100, tokens)
        docs.append({"tokens": tokens.tolist(), **({"labels": labels.tolist()} if with_labels else {})})
    return list(pack_documents_with_positions(docs, PACK_SEQ))[:n_rows]


def _per_document_loss(model, rows, documents=True):
    """Reference token-mean CE: every document (documents=False: every whole row) through the model on its own,
    positions from 0, the target of t = label of t + 1 inside the document."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels, pos = (torch.tensor(row[k]) for k in ("input_ids", "labels", "position_ids"))
            starts = (pos == 0).nonzero().flatten().tolist() if documents else [0]
            for lo, hi in zip(starts, starts[1:] + [len(ids)]):
                logits = model(ids[None, lo:hi], use_cache=False).logits[0].double()
                tgt = labels[lo + 1:hi]
                total += F.cross_entropy(logits[:-1], tgt, ignore_index=-100, reduction="sum").item()
                count += int((tgt != -100).sum())
    return total / count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_attend_within_documents_under_data_parallel(attn):
    """What train.py does with a packed batch under data_parallel (CausalLMWithShardedLoss: the decoder with
    position_ids, no cache, no mask; shift_targets with the positions) gives the per-document loss."""
    from transformers import AutoModelForCausalLM

    from easy_context.data import shift_targets

    config = training.load_config("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()
    rows = _packed_rows(3, seed=1)
    ids, labels, pos = (torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids"))
    wrapper = training.CausalLMWithShardedLoss(model)
    with torch.no_grad():
        packed = wrapper(ids, pos, shift_targets(labels, position_ids=pos)).global_loss.item()
        unmasked = wrapper(ids, None, shift_targets(labels)).global_loss.item()
    ref = _per_document_loss(model, rows)
    assert abs(packed - ref) <= PACK_TOL * ref, (packed, ref)
    assert abs(unmasked - ref) > 100 * PACK_TOL * ref  # the reference tells apart packed and unmasked


def test_train_packing_flag(tmp_path):
    """train.py --packing auto|documents|none in one process (data_parallel): the logged step-1 loss (learning rate
    0: the returned model is the initial one) is the per-document loss with positions, the whole-row loss without."""
    from datasets import Dataset


    rows = _packed_rows(2, seed=3)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "packed"))
    Dataset.from_list([{k: r[k] for k in ("input_ids", "labels")} for r in rows]).save_to_disk(
        str(tmp_path / "plain"))
    Dataset.from_list([{**r, "position_ids": [p + 1 for p in r["position_ids"]]} for r in rows]).save_to_disk(
        str(tmp_path / "bad"))
    argv = ["--seq-algo", "data_parallel", "--model-config", "tiny-llama", "--init-random", "--seq-length",
            str(PACK_SEQ), "--batch-size", "2", "--max-train-steps", "1", "--learning-rate", "0", "--report-to",
            "none", "--no-save-model"]
    got = {}
    for packing in ("auto", "documents", "none"):
        out = _train([*argv, "--dataset", str(tmp_path / "packed"), "--packing", packing,
                      "--output-dir", str(tmp_path / packing)])
        got[packing] = (out["losses"][1], out["model"])
    for packing, documents in (("auto", True), ("documents", True), ("none", False)):
        loss, model = got[packing]
        ref = _per_document_loss(model, rows, documents=documents)
        assert abs(loss - ref) <= PACK_TOL * ref, (packing, loss, ref)
    assert abs(got["auto"][0] - got["none"][0]) > 100 * PACK_TOL * got["none"][0]  # tells apart
    with pytest.raises(ValueError, match="--packing documents: dataset .* has no 'position_ids' column: re-pack it "
                                         "with `python prepare_data.py --packing documents"):
        _train([*argv, "--dataset", str(tmp_path / "plain"), "--packing", "documents",
                "--output-dir", str(tmp_path / "plain_run")])
    with pytest.raises(ValueError, match="row .: position_ids start at 1, not 0"):
        _train([*argv, "--dataset", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "bad_run")])


def _sp_packing_supported():
    """Feature probe: prepare_seq_parallel_inputs accepts restarting positions under sequence parallelism."""
    from easy_context.api import prepare_seq_parallel_inputs

    try:
        prepare_seq_parallel_inputs("zigzag_ring_attn", torch.zeros(1, 8, dtype=torch.long),
                                    torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), None, 0, 2, "cpu")
    except ValueError:
        return False
    return True


def _packed_sp_worker(rank, world, root, dataset, argv):
    _accelerate_env(rank, world)
    return {name: _losses(_train([*argv, "--dataset", dataset, "--output-dir", f"{root}/{name.replace(' ', '_')}",
                                  "--seq-algo", algo, *extra]))
            for name, algo, extra in (("zigzag", "zigzag_ring_attn", ()),
                                      ("zigzag sp_size=1", "zigzag_ring_attn", ("--sp-size", "1")))}


@pytest.mark.skipif(not _sp_packing_supported(), reason="sequence-parallel attention over packed documents not "
                    "available yet (prepare_seq_parallel_inputs refuses restarting positions)")
def test_packed_rows_under_sequence_parallelism_match_one_process(tmp_path):
    """Packed rows trained by 2 zigzag ranks (one sequence over both; and 2 replicas of sp_size 1): the loss curve of
    one data_parallel process (batch 1 resp. 2) on the same data."""
    from datasets import Dataset


    dataset = str(tmp_path / "packed")
    Dataset.from_list(_packed_rows(8, seed=5)).save_to_disk(dataset)
    argv = ["--model-config", "tiny-llama", "--init-random", "--seq-length", str(PACK_SEQ), "--max-train-steps", "3",
            "--learning-rate", "3e-3", "--seed", "7", "--attn-backend", "math", "--report-to", "none",
            "--no-save-model", "--packing", "documents"]
    one = {b: _losses(_train([*argv, "--seq-algo", "data_parallel", "--batch-size", str(b), "--dataset", dataset,
                              "--output-dir", str(tmp_path / f"one_b{b}")])) for b in (1, 2)}
    two = run_distributed(_packed_sp_worker, 2, str(tmp_path), dataset, argv, timeout=200)
    _close(two[0]["zigzag"], one[1], "packed zigzag_ring_attn on 2 ranks")
    _close(two[0]["zigzag sp_size=1"], one[2], "packed zigzag_ring_attn sp_size=1 on 2 replicas")
