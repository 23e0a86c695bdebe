"""The training-script API (easy_context/api.py): input sharding and padding, the seed's usage snippet, odd
lengths, DP x SP, data loading and output gathering. Multi-process cases share one 4-rank gloo group.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed

from easy_context.api import (
    apply_seq_parallel_monkey_patch,
    gather_seq_parallel_outputs,
    prepare_dataloader,
    prepare_seq_parallel_inputs,
)
from easy_context.attention.registry import SEQ_ALGOS, sequence_granularity, shard_sequence
from easy_context.integrations import hf
from easy_context.loss import sharded_cross_entropy

# fp32 everywhere; SP re-associates softmax and loss sums (~1e-7 relative per op, ~1e-6 measured after two
# layers and backward). 1e-4 relative to the tensor's largest magnitude leaves margin; real bugs are >1e-2.
RTOL = 1e-4
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)


def _close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert err <= RTOL * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).float()


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("algo", SEQ_ALGOS)
def test_prepare_inputs_pads_and_shards(algo):
    world, seq = 4, 37
    ids = torch.arange(100, 100 + 2 * seq).view(2, seq)
    pos = torch.arange(5, 5 + seq)[None]
    tgt = ids + 1000
    gran = sequence_granularity(algo, world)
    padded = seq if algo == "data_parallel" else -(-seq // gran) * gran
    pids = torch.cat([ids, torch.full((2, padded - seq), 7)], 1)
    ppos = torch.arange(5, 5 + padded)[None]  # positions continue through the padding
    ptgt = torch.cat([tgt, torch.full((2, padded - seq), -100)], 1)
    pieces = []
    for rank in range(world):
        out = prepare_seq_parallel_inputs(algo, ids, pos, tgt, rank, world, "cpu", pad_token_id=7)
        assert set(out) == {"local_input_ids", "local_position_ids", "local_target_ids", "work_balance"}
        assert out["work_balance"] is None  # reported only when asked to balance documents
        for key, full in (("local_input_ids", pids), ("local_position_ids", ppos), ("local_target_ids", ptgt)):
            expect = full if algo == "data_parallel" else shard_sequence(algo, full, rank, world)
            assert torch.equal(out[key], expect), (algo, rank, key)
        pieces.append(out["local_input_ids"])
    if algo != "data_parallel":
        assert sum(p.shape[1] for p in pieces) == padded  # every token lands on exactly one rank


def test_prepare_inputs_sp_size_uses_rank_within_group():
    ids = torch.arange(32)[None]
    for rank in range(4):
        got = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, ids, rank, 4, "cpu", sp_size=2)
        assert torch.equal(got["local_input_ids"], shard_sequence("zigzag_ring_attn", ids, rank % 2, 2))
        assert torch.equal(got["local_position_ids"], shard_sequence("zigzag_ring_attn", ids, rank % 2, 2))
    got = prepare_seq_parallel_inputs("usp_attn", ids, None, None, 3, 4, "cpu", ring_degree=2)
    assert got["local_target_ids"] is None
    assert torch.equal(got["local_input_ids"], shard_sequence("usp_attn", ids, 3, 4, ring_degree=2))


def test_one_sp_config_or_the_seed_strings():
    """Every API function takes one SPAttentionConfig; the seed's name + keywords build the same object."""
    from easy_context import SPAttentionConfig
    from easy_context.sp_config import sp_config

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 37))
    tgt = torch.randint(0, 100, (2, 37))
    for algo, kw in (("zigzag_ring_attn", {}), ("usp_attn", {"ring_degree": 2}), ("ulysses_attn", {"sp_size": 2}),
                     ("data_parallel", {})):
        config = SPAttentionConfig(algo, **kw)
        assert sp_config(algo, **kw) == config and sp_config(config) is config
        for rank in range(4):
            by_name = prepare_seq_parallel_inputs(algo, ids, None, tgt, rank, 4, "cpu", **kw)
            by_config = prepare_seq_parallel_inputs(config, ids, None, tgt, rank, 4, "cpu")
            for key in ("local_input_ids", "local_position_ids", "local_target_ids"):
                assert torch.equal(by_name[key], by_config[key]), (algo, rank, key)
    model = _llama()
    config = SPAttentionConfig("usp_attn", ring_degree=2, backend="math")
    assert apply_seq_parallel_monkey_patch(config, model) == config.name == model.config._attn_implementation
    assert apply_seq_parallel_monkey_patch(SPAttentionConfig("data_parallel"), _llama()) is None
    with pytest.raises(ValueError, match="given both in the SPAttentionConfig and as keywords"):
        prepare_seq_parallel_inputs(config, ids, None, None, 0, 4, "cpu", ring_degree=2)
    with pytest.raises(ValueError, match="given both"):
        apply_seq_parallel_monkey_patch(config, model, sp_size=2)
    with pytest.raises(TypeError, match="algorithm name or an SPAttentionConfig"):
        prepare_seq_parallel_inputs(3, ids, None, None, 0, 4, "cpu")
    with pytest.raises(ValueError, match="unknown seq_algo"):
        SPAttentionConfig("ring")
    with pytest.raises(ValueError, match="ring_degree is a usp_attn option"):
        SPAttentionConfig("zigzag_ring_attn", ring_degree=2)
    with pytest.raises(ValueError, match="sp_size=0 must be a positive int"):
        SPAttentionConfig("zigzag_ring_attn", sp_size=0)
    with pytest.raises(ValueError, match="nothing to register"):
        hf.register_attention(SPAttentionConfig("data_parallel"))


def test_prepare_inputs_errors():
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="sp_size=3 must be a positive divisor of world_size=4"):
        prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, None, 0, 4, "cpu", sp_size=3)
    with pytest.raises(ValueError, match="unknown seq_algo"):
        prepare_seq_parallel_inputs("ring", ids, None, None, 0, 4, "cpu")
    packed = torch.cat([torch.arange(8), torch.arange(8)])[None]
    # packed rows shard like any row (the patched attention reads the documents from the positions) ...
    out = prepare_seq_parallel_inputs("ulysses_attn", ids, packed, None, 1, 4, "cpu")
    assert torch.equal(out["local_position_ids"], packed[:, 4:8])
    # ... except for dist_flash_attn, and positions must restart at 0
    with pytest.raises(ValueError, match="dist_flash_attn does not support packed documents"):
        prepare_seq_parallel_inputs("dist_flash_attn", ids, packed, None, 0, 4, "cpu")
    with pytest.raises(ValueError, match="position 3 follows 7 at token 8"):
        prepare_seq_parallel_inputs("zigzag_ring_attn", ids, packed + (packed == 0) * 3 * (torch.arange(16) > 0),
                                    None, 0, 4, "cpu")
    # data_parallel runs the model's own attention, which does honour packed positions
    out = prepare_seq_parallel_inputs("data_parallel", ids, packed, None, 0, 4, "cpu")
    assert torch.equal(out["local_position_ids"], packed)


_IDS = torch.arange(16)[None]


@pytest.mark.parametrize("algo", ["zigzag_ring_attn", "data_parallel"])
@pytest.mark.parametrize("args, error, match", [
    ((_IDS, None, None, 4, 4), ValueError, r"rank 4 is outside \[0, world_size=4\)"),
    ((_IDS, None, None, -1, 4), ValueError, r"rank -1 is outside \[0, world_size=4\)"),
    ((_IDS, None, None, 0, 0), ValueError, r"rank 0 is outside \[0, world_size=0\)"),
    ((_IDS, None, None, 1.0, 4), TypeError, "rank must be an int"),
    ((_IDS.float() + 0.7, None, None, 0, 4), TypeError, "input_ids must be an integer tensor.*float32"),
    ((_IDS.bool(), None, None, 0, 4), TypeError, "input_ids must be an integer tensor.*bool"),
    ((_IDS, _IDS.double(), None, 0, 4), TypeError, "position_ids must be an integer tensor"),
    ((_IDS, None, _IDS.half(), 0, 4), TypeError, "target_ids must be an integer tensor"),
])
def test_prepare_inputs_refuses_bad_ranks_and_dtypes(algo, args, error, match):
    ids, pos, tgt, rank, world = args
    with pytest.raises(error, match=match):
        prepare_seq_parallel_inputs(algo, ids, pos, tgt, rank, world, "cpu")


# ----------------------------------------------------------------------------- 4 ranks


def _seed_snippet(rank, world, path):
    """The seed's usage snippet, verbatim except attn_implementation="sdpa"."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(64)[None]
    tgt = ids.roll(-1, 1)
    device = "cpu"
    try:
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", "llama")
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        prepared = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, pos, tgt, rank, world, device)
        logits = model(prepared["local_input_ids"], position_ids=prepared["local_position_ids"]).logits
    finally:
        hf.unpatch_model_type("llama")
    assert model.config._attn_implementation == "easy_context_zigzag_ring_attn"
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert ref.config._attn_implementation == "sdpa"
    with torch.no_grad():
        full = ref(ids, position_ids=pos).logits
    _close(gather_seq_parallel_outputs("zigzag_ring_attn", logits.detach()), full, "seed snippet logits")


def _odd_length(rank, world):
    """1001 tokens on 4 ranks: padded to the granularity, same loss, gradients and predictions as unsharded."""
    seq = 1001
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 128, (1, seq), generator=gen)
    tgt = ids.roll(-1, 1)
    tgt[:, -1] = -100
    base = _llama()
    ref = copy.deepcopy(base)
    ref_logits = ref(ids).logits
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), tgt.flatten())
    ref_loss.backward()
    for algo in ("zigzag_ring_attn", "usp_attn"):
        model = copy.deepcopy(base)
        apply_seq_parallel_monkey_patch(algo, model)
        p = prepare_seq_parallel_inputs(algo, ids, torch.arange(seq)[None], tgt, rank, world, "cpu")
        assert p["local_input_ids"].shape[1] == 1008 // world
        hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
        out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"])
        out.loss.backward()
        _close(out.global_loss, ref_loss.detach(), f"{algo} odd-length loss")
        assert out.num_tokens.item() == seq - 1
        preds = gather_seq_parallel_outputs(algo, model.lm_head(hidden).argmax(-1), seq_len=seq)
        assert preds.shape == (1, seq) and torch.equal(preds, ref_logits.argmax(-1))
        for (name, param), ref_param in zip(model.named_parameters(), ref.parameters()):
            grad = param.grad.clone()
            dist.all_reduce(grad)
            _close(grad / world, ref_param.grad, f"{algo} odd-length grad {name}")


def _dp_sp(rank, world):
    """world 4, sp_size 2: ranks {0,1} train sample A, {2,3} sample B; DDP-averaged gradients equal those of
    the unsharded token-mean loss over the batch [A, B] (A and B have equally many valid targets, so this is
    also the average of the two samples' losses)."""
    sp = 2
    gen = torch.Generator().manual_seed(3)
    batch = torch.randint(0, 128, (2, 40), generator=gen)
    tgt = batch.roll(-1, 1)
    tgt[:, -1] = -100
    base = _llama()
    ref = copy.deepcopy(base)
    ref_loss = F.cross_entropy(ref(batch).logits.flatten(0, 1), tgt.flatten())
    ref_loss.backward()
    mine = rank // sp  # this rank's data-parallel replica
    for algo, opts in (("zigzag_ring_attn", {}), ("ulysses_attn", {}), ("usp_attn", {"ring_degree": 2})):
        model = copy.deepcopy(base)
        apply_seq_parallel_monkey_patch(algo, model, sp_size=sp, **opts)
        p = prepare_seq_parallel_inputs(algo, batch[mine:mine + 1], None, tgt[mine:mine + 1], rank, world, "cpu",
                                        sp_size=sp, **opts)
        assert p["local_input_ids"].shape[1] == 40 // sp
        hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
        out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"])  # world token mean
        out.loss.backward()
        _close(out.global_loss, ref_loss.detach(), f"{algo} dpxsp loss")
        for (name, param), ref_param in zip(model.named_parameters(), ref.parameters()):
            grad = param.grad.clone()
            dist.all_reduce(grad)
            _close(grad / world, ref_param.grad, f"{algo} dpxsp grad {name}")
        full = gather_seq_parallel_outputs(algo, p["local_input_ids"], sp_size=sp, **opts)
        assert torch.equal(full, batch[mine:mine + 1])  # gathered within the SP group only


def _dataloaders(rank, world):
    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    assert (accelerator.process_index, accelerator.num_processes) == (rank, world)
    data = torch.utils.data.TensorDataset(torch.arange(32))
    seen = {}
    for algo, sp in (("data_parallel", None), ("zigzag_ring_attn", None), ("ulysses_attn", 2)):
        loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
        prepared = prepare_dataloader(algo, loader, accelerator, sp_size=sp)
        seen[(algo, sp)] = [b[0].tolist() for b in prepared]
    return seen


def _same_batch_rows(rank, world):
    """Ranks of one SP group given different batches (the DistributedSampler habit and its cousins): the error text of
    each row on this rank ("ok" when accepted)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 64), generator=gen)
    tgt = ids.roll(-1, 1)
    rows = {
        "the same batch": lambda: (ids, None, tgt),
        "rank r gets row r % 2": lambda: (ids[rank % 2:rank % 2 + 1], None, tgt[rank % 2:rank % 2 + 1]),
        "one token differs on rank 3": lambda: (ids + (rank == 3) * (torch.arange(64) == 40), None, tgt),
        "lengths 64 and 62 that pad to the same size": lambda: (ids[:, :64 - 2 * (rank % 2)], None,
                                                               tgt[:, :64 - 2 * (rank % 2)]),
        "other targets on rank 1": lambda: (ids, None, tgt if rank != 1 else ids),
        "other positions on rank 2": lambda: (ids, torch.arange(64)[None] + (rank == 2), tgt),
    }
    out = {}
    for sp_size in (None, 2):
        for name, row in rows.items():
            batch = row()
            if sp_size == 2 and name == "rank r gets row r % 2":
                batch = (ids[rank // 2:rank // 2 + 1], None, tgt[rank // 2:rank // 2 + 1])  # replica r: row r
                name = "replica r gets row r"
            try:
                prepare_seq_parallel_inputs("zigzag_ring_attn", *batch, rank, world, "cpu", sp_size=sp_size)
                out[(name, sp_size)] = "ok"
            except ValueError as e:
                out[(name, sp_size)] = str(e)
    for name, r, w in (("the local rank for the global one", rank % 2, world), ("world_size 2 of 4", rank % 2, 2)):
        try:
            prepare_seq_parallel_inputs("ulysses_attn", ids, None, tgt, r, w, "cpu", sp_size=2)
            out[(name, 2)] = "ok"
        except ValueError as e:
            out[(name, 2)] = str(e)
    return out


def _worker(rank, world, path):
    _seed_snippet(rank, world, path)
    _odd_length(rank, world)
    _dp_sp(rank, world)
    return {"loaders": _dataloaders(rank, world), "same batch": _same_batch_rows(rank, world)}


@pytest.fixture(scope="module")
def on_4_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "tiny-llama"
    _llama().save_pretrained(path)
    return run_distributed(_worker, 4, str(path), timeout=300)


SAME_BATCH = "must pass the same full batch, but their {} differ.*prepare_dataloader"
# (row, sp_size) -> the error on ranks 0..3 (None: accepted there)
SAME_BATCH_EXPECTED = {
    ("the same batch", None): [None] * 4,
    ("rank r gets row r % 2", None): [SAME_BATCH.format("input_ids, target_ids")] * 4,
    ("one token differs on rank 3", None): [SAME_BATCH.format("input_ids")] * 4,
    ("lengths 64 and 62 that pad to the same size", None): [SAME_BATCH.format("length, input_ids.*")] * 4,
    ("other targets on rank 1", None): [SAME_BATCH.format("target_ids")] * 4,
    ("other positions on rank 2", None): [SAME_BATCH.format("position_ids")] * 4,
    ("the same batch", 2): [None] * 4,
    ("replica r gets row r", 2): [None] * 4,  # different replicas, different rows: the point of DP x SP
    ("one token differs on rank 3", 2): [None, None, SAME_BATCH.format("input_ids"), SAME_BATCH.format("input_ids")],
    ("lengths 64 and 62 that pad to the same size", 2): [SAME_BATCH.format("length, input_ids.*")] * 4,
    ("other targets on rank 1", 2): [SAME_BATCH.format("target_ids")] * 2 + [None] * 2,
    ("other positions on rank 2", 2): [None] * 2 + [SAME_BATCH.format("position_ids")] * 2,
    ("the local rank for the global one", 2): [None] * 2 + ["process 2 passed rank=0, process 3 passed rank=1.*not "
                                                            "the local rank"] * 2,
    ("world_size 2 of 4", 2): ["world_size=2, but torch.distributed runs 4 processes"] * 4,
}


@pytest.mark.parametrize("row", SAME_BATCH_EXPECTED, ids=lambda r: f"{r[0]}, sp_size={r[1]}")
def test_ranks_of_an_sp_group_must_get_the_same_batch(on_4_ranks, row):
    import re

    for rank, expected in enumerate(SAME_BATCH_EXPECTED[row]):
        got = on_4_ranks[rank]["same batch"][row]
        assert got == "ok" if expected is None else re.search(expected, got), (row, rank, got)


def test_api_on_4_ranks(on_4_ranks):
    seen = [r["loaders"] for r in on_4_ranks]

    def flat(batches):
        return sorted(x for b in batches for x in b)

    dp = [s[("data_parallel", None)] for s in seen]
    assert flat(sum(dp, [])) == list(range(32))  # data parallel: disjoint shards covering the data
    sp = [s[("zigzag_ring_attn", None)] for s in seen]
    assert all(s == sp[0] for s in sp) and flat(sp[0]) == list(range(32))  # one SP group: same batches
    assert sp[0] != [[x for x in range(32)][i:i + 2] for i in range(0, 32, 2)]  # and still shuffled
    mesh = [s[("ulysses_attn", 2)] for s in seen]
    assert mesh[0] == mesh[1] and mesh[2] == mesh[3] and mesh[0] != mesh[2]  # same within, different across
    assert flat(mesh[0] + mesh[2]) == list(range(32))
