"""Shared tiny HF decoders and comparison helpers for the feature tests (test_memory.py, test_fused.py)."""
import torch
import torch.nn.functional as F

# fp32. Checkpointing and offload replay the identical ops on identical inputs (bitwise equal on CPU); the
# preserved attention differentiates the very graph of the first forward; tiled MLP changes the matmul shapes
# and sums parameter gradients over tiles, i.e. re-associates fp32 sums (~1e-7 relative, measured <1e-6 after
# 2 layers and backward). 1e-5 relative to each tensor's largest magnitude leaves margin; a dropped tile, a
# missing gradient or a stale attention output is off by >1e-2.
RTOL = 1e-5
# Under sequence parallelism the ring merges and per-rank loss/gradient sums re-associate more (see test_hf.py).
SP_RTOL = 1e-4

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)
SEQ = 40


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**SMALL),
        "mistral": MistralConfig(**SMALL),
        "qwen2": Qwen2Config(**SMALL),
        "qwen3": Qwen3Config(head_dim=16, **SMALL),
    }


def _model(cfg=None, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg or _configs()["llama"], attn_implementation=attn).float()
    return model.train()


def _batch(seq=SEQ):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, seq), generator=g)
    tgt = torch.randint(0, SMALL["vocab_size"], (2, seq), generator=g)
    return ids, tgt


def _run(model, ids, tgt):
    """Loss and parameter gradients of one forward/backward."""
    logits = model(ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(actual, expected, what, rtol=RTOL):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def _assert_same(result, reference, what):
    _close(result[0], reference[0], f"{what} loss")
    assert result[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        _close(result[1][name], grad, f"{what} grad {name}")


def _saved_bytes(fn, *args):
    """Bytes of the tensors autograd saves for backward while running fn (shared storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())
