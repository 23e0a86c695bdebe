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
from easy_context.integrations import hf
from easy_context.api import (apply_seq_parallel_monkey_patch, gather_seq_parallel_outputs, prepare_dataloader,
                              prepare_seq_parallel_inputs)
from easy_context.loss import sharded_cross_entropy
from easy_context.attention.registry import SEQ_ALGOS, sequence_granularity, shard_sequence

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


def _worker(rank, world, path):
    _seed_snippet(rank, world, path)
    _odd_length(rank, world)
    _dp_sp(rank, world)
    return _dataloaders(rank, world)


def test_api_on_4_ranks(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "tiny-llama")
    seen = run_distributed(_worker, 4, str(tmp_path / "tiny-llama"), timeout=300)

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
