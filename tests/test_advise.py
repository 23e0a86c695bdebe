"""The memory model against the H200 measurements it was calibrated on, and its choices."""
import os

from easy_context.advise import ModelShape, PRESETS, advise, check

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")


def test_predictions_track_the_measured_peaks():
    rows = []
    for name in ("train_step_run2.jsonl", "train_step_run3.jsonl", "train_step_run4.jsonl"):
        rows += check(os.path.join(RESULTS, name))
    assert len(rows) >= 5
    for mode, seq, predicted, measured in rows:
        # a first-order model calibrated on two of these runs: it may over-predict short runs (fixed costs are
        # smaller than its per-token terms: +26% at 16K) but must not under-predict any run by more than 10%,
        # since an under-prediction is an OOM for the user
        assert -0.10 * measured <= predicted - measured <= 0.30 * measured, (mode, seq, predicted, measured)


def test_choices():
    llama = ModelShape(**PRESETS["llama-2-7b"])
    assert advise(llama, 1 << 20, 8, 141, 128).seq_algo == "ulysses_attn"
    odd = ModelShape(hidden=4032, layers=32, heads=28, kv_heads=4, intermediate=11008, vocab=32000)
    plan = advise(odd, 1 << 20, 8, 141, 128)  # 28 heads: Ulysses 4 x ring 2
    assert (plan.seq_algo, plan.ring_degree) == ("usp_attn", 2)
    prime = ModelShape(hidden=4060, layers=32, heads=29, kv_heads=29, intermediate=11008, vocab=32000)
    assert advise(prime, 1 << 20, 8, 141, 128).seq_algo == "zigzag_ring_attn"
    short = advise(llama, 1 << 16, 1, 141, 128)
    assert not short.offload_checkpoints and short.gpu_gib < 141
