"""train.py --lora-r (peft adapters under SP) and --fsdp2 (torch's fully_shard, applied by training/sharding.py):
2 gloo ranks train to the same losses and the same saved weights as one process.

One 1-rank and one 2-rank group run every training (process starts dominate on a 2-core box); the runs reuse
test_train's helpers (argv, accelerate reset, environment).
"""
import os

import pytest
import torch
from _dist import run_distributed
from test_train import _accelerate_env, _argv, _close, _losses, _train

from easy_context import training

LORA = ("--lora-r", "4", "--lora-alpha", "8")  # dropout 0 (the default): both sides draw no random masks
# LoRA's B starts at zero: a learning rate high enough that the adapters move the loss within 3 steps
LORA_LR = ("--learning-rate", "1e-2")

# Saved weights: fp32, the same summation-order differences as the losses (test_train's RTOL comment, ~1e-6
# relative in the gradients). Adam's step is m / (sqrt(v) + eps) per element, ~lr * sign(g) early on: where a
# gradient element is near zero its relative error is large, and the two runs' steps there differ by up to a fraction
# of lr (measured: at most 3.4e-5 after 3 steps, lr 3e-3 for full weights, 1e-2 for LoRA). 3e-4 keeps a margin
# of ~10x and stays below one step's move (~lr per element) that a lost shard, an unsaved rank's adapter or a skipped
# update would leave.
WEIGHT_ATOL = 3e-4


def _weights(folder):
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if os.path.exists(f"{folder}/adapter_model.safetensors") else \
        "model.safetensors"
    return {k: v.float() for k, v in load_file(f"{folder}/{name}").items()}


def _one_rank_worker(rank, world, root):
    _accelerate_env(rank, world)
    return {
        "lora": _losses(_train(_argv(f"{root}/w1_lora", "data_parallel", *LORA, *LORA_LR))),
        "full": _losses(_train(_argv(f"{root}/w1_full", "data_parallel"))),
        "full batch2": _losses(_train(_argv(f"{root}/w1_full_b2", "data_parallel", batch=2))),
    }


TWO_RANK_RUNS = {  # name: (--seq-algo, flags, the one-process run it must match)
    "lora zigzag_ring_attn": ("zigzag_ring_attn", (*LORA, *LORA_LR), "lora"),
    "lora ulysses_attn": ("ulysses_attn", (*LORA, *LORA_LR), "lora"),
    "fsdp2 zigzag_ring_attn (SP=2)": ("zigzag_ring_attn", ("--fsdp2",), "full"),
    "fsdp2 data_parallel (DP=2)": ("data_parallel", ("--fsdp2",), "full batch2"),
    "fsdp2 + lora ulysses_attn": ("ulysses_attn", ("--fsdp2", *LORA, *LORA_LR), "lora"),
}


def _two_rank_worker(rank, world, root):
    _accelerate_env(rank, world)
    from torch.distributed.tensor import DTensor

    out = {}
    for i, (name, (algo, flags, _)) in enumerate(TWO_RANK_RUNS.items()):
        result = _train(_argv(f"{root}/run{i}", algo, *flags))
        out[name] = _losses(result)
        # FSDP2 really sharded: each rank holds a DTensor shard of every parameter
        out[name + " sharded"] = all(isinstance(p, DTensor) for p in result["model"].parameters())
    # resume: an uninterrupted 4-step run vs one "killed" after its step-2 checkpoint, then resumed (FSDP2's sharded
    # model + optimizer state; LoRA's frozen base and adapters under DDP)
    for name, flags in RESUMES.items():
        tag = name.replace(" ", "_")
        full = _train(_argv(f"{root}/{tag}_full", "zigzag_ring_attn", *flags, "--checkpointing-steps", "2",
                            "--no-save-model", steps=4))
        _train(_argv(f"{root}/{tag}", "zigzag_ring_attn", *flags, "--checkpointing-steps", "2", "--stop-after-steps",
                     "2", steps=4))
        resumed = _train(_argv(f"{root}/{tag}", "zigzag_ring_attn", *flags, "--resume-from-checkpoint", "latest",
                               "--no-save-model", steps=4))
        out[name] = (_losses(full), resumed["losses"])
    return out


RESUMES = {"fsdp2 resume": ("--fsdp2",), "lora resume": (*LORA, *LORA_LR)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("sharding")
    one = run_distributed(_one_rank_worker, 1, str(root), timeout=200)[0]
    two = run_distributed(_two_rank_worker, 2, str(root), timeout=300)
    return root, one, two


@pytest.mark.parametrize("name", list(TWO_RANK_RUNS))
def test_two_ranks_match_one_process(runs, name):
    root, one, two = runs
    _, _, ref = TWO_RANK_RUNS[name]
    assert two[0][name] == two[1][name]  # the logged global loss is the same number on every rank
    assert two[0][name + " sharded"] == ("--fsdp2" in TWO_RANK_RUNS[name][1])
    _close(two[0][name], one[ref], name)
    got = _weights(f"{root}/run{list(TWO_RANK_RUNS).index(name)}")
    want = _weights(f"{root}/w1_{ref.replace('full batch2', 'full_b2')}")
    assert got.keys() == want.keys()
    if ref == "lora":  # the adapter only, and it trained
        assert all("lora_" in k for k in got) and any(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)
    err = max((got[k] - want[k]).abs().max().item() for k in got)
    print(f"{name}: losses {two[0][name]} vs {one[ref]}; weights max abs diff {err:.2e}")
    assert err <= WEIGHT_ATOL, f"{name}: saved weights differ by {err:.2e}"


@pytest.mark.parametrize("name", list(RESUMES))
def test_resume_reproduces_the_uninterrupted_run(runs, name):
    _, _, two = runs
    full, resumed = two[0][name]
    assert sorted(resumed) == [3, 4]
    # the same processes and order of operations: exact up to the reloaded state's round trip (exact in practice)
    _close([resumed[3], resumed[4]], full[2:], name)


def test_lora_moves_the_loss_and_only_the_adapters(runs):
    _, one, _ = runs
    assert one["lora"][-1] < one["lora"][0] and one["lora"] != one["full"]


def test_bad_sharding_and_lora_flags(monkeypatch):
    parse = training.build_parser().parse_args
    base = ["--model-config", "tiny-llama", "--init-random", "--output-dir", "x"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="--fsdp2.*DeepSpeed"):
        training.validate_args(parse([*base, "--fsdp2"]), 2)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ValueError, match="--mixed-precision bf16"):
        training.validate_args(parse([*base, "--fsdp2", "--mixed-precision", "fp16"]), 2)
    with pytest.raises(ValueError, match="add --lora-r"):
        training.validate_args(parse([*base, "--lora-alpha", "32"]), 1)
    with pytest.raises(ValueError, match="--lora-r must be >= 1"):
        training.validate_args(parse([*base, "--lora-r", "0"]), 1)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'easy-context\[peft\]'"):
        training.validate_args(parse([*base, "--lora-r", "8"]), 1)


def test_lora_flags_are_resume_settings():
    from easy_context.training.resume import run_settings

    parse = training.build_parser().parse_args
    base = ["--model-config", "tiny-llama", "--init-random", "--output-dir", "x"]

    def settings(*flags):
        return run_settings(training.validate_args(parse([*base, *flags]), 1), replicas=1, packed=False,
                            dtype=torch.float32, mixed_precision="no", fingerprint="0" * 16)

    plain, lora = settings(), settings("--lora-r", "8", "--lora-target-modules", "q_proj,v_proj")
    assert "--lora-r" not in plain and "--fsdp2" not in plain  # checkpoints of earlier runs still resume
    assert lora["--lora-r"] == 8 and lora["--lora-target-modules"] == "q_proj,v_proj"
    assert settings("--fsdp2")["--fsdp2"] is True
