"""Does a model learn the needle demo's retrieval task? A CPU-sized probe, outside train.py.

Trains a small byte-level Llama on :func:`examples.needle_demo.rows.fact_rows` (train key space) and every 100
steps scores the retrieval on eval_needle.py's own prompts (eval key space, distractors = facts - 1) at the trained
length. Prints one JSON line per evaluation. Used to pick the demo's task after the 2-GPU run learned nothing
(bench/RESULTS.md 10e):

    OMP_NUM_THREADS=1 python bench/needle_probe.py --seq 256 --facts 4 --key-length 3 --digits 3 --steps 2000
    OMP_NUM_THREADS=1 python bench/needle_probe.py --curriculum 256:4:1500 512:8:600   # one stage after another
    OMP_NUM_THREADS=1 python bench/needle_probe.py --eval-beyond 2 4   # also scored at 2x and 4x the trained length
    OMP_NUM_THREADS=1 python bench/needle_probe.py --curriculum 128x2:2:1500 256:4:2500   # rows of two 128-token
                                                                       # segments, positions 0..255, then 256
    python bench/needle_probe.py --hidden 512 --intermediate 1408 --layers 8 --heads 8 --kv-heads 4 --bf16 \
        --seconds 300        # the demo's model shape on a GPU (bench/needle_sweep.sh runs several side by side)
"""
import argparse
import json
import os
import random
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from easy_context.eval.haystack import load_haystack  # noqa: E402
from easy_context.eval.needle import NEEDLE_TASKS, NeedleConfig, SentenceBoundaries, build_prompt  # noqa: E402
from easy_context.eval.tiny import make_tokenizer  # noqa: E402
from examples.needle_demo.rows import fact_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    for flag, default in (("seq", 256), ("facts", 4), ("key-length", 3), ("digits", 3), ("steps", 1500),
                          ("batch", 16), ("hidden", 128), ("intermediate", 0), ("layers", 4), ("heads", 4),
                          ("kv-heads", 2), ("eval-samples", 32), ("eval-every", 100), ("seconds", 0)):
        ap.add_argument(f"--{flag}", type=int, default=default)  # intermediate 0: 3 x hidden; seconds 0: no limit
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--other-labels", type=float, default=0.05, help="share of filler tokens with a loss")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 weights, as the demo trains")
    ap.add_argument("--curriculum", nargs="*", default=None, metavar="SEQ:FACTS:STEPS[:NEAR]",
                    help="stages trained one after another (instead of --seq/--facts/--steps); NEAR: the stage's "
                    "share of near-miss keys (default --near-keys)")
    ap.add_argument("--eval-beyond", type=int, nargs="*", default=[], metavar="X",
                    help="also score at X times the trained length (e.g. 2 4): does retrieval extend past it?")
    ap.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base of the model")
    ap.add_argument("--near-keys", type=float, default=0.0,
                    help="share of a row's keys drawn as near misses of its other keys (facts.draw_facts)")
    a = ap.parse_args()
    def stage(spec: str) -> tuple:
        """SEQ:FACTS:STEPS[:NEAR] -> (segment, segments per row, facts, steps, near). SEQ may be SEGxK: rows of K
        segments of SEG tokens, positions running on across them (documents concatenated into fixed-length rows, as
        pretraining corpora are), so every row has SEG x K positions."""
        seq, facts, steps, *near = spec.split(":")
        seg, _, per_row = seq.partition("x")
        return int(seg), int(per_row or 1), int(facts), int(steps), float(near[0]) if near else a.near_keys

    stages = [stage(c) for c in a.curriculum] if a.curriculum else [(a.seq, 1, a.facts, a.steps, a.near_keys)]
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=a.bf16)
    tok = make_tokenizer("bytes")
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate or 3 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=len(tok),
        max_position_embeddings=4 * max(st[0] * st[1] for st in stages),
        rope_theta=a.rope_theta,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)

    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "device": device,
                      **{k: v for k, v in vars(a).items() if v is not None}}), flush=True)
    boundaries, haystacks = SentenceBoundaries(tok), {}  # one haystack per evaluated length, built once

    @torch.no_grad()
    def accuracy(seq: int, facts: int, within: int = 0) -> dict:
        """Retrieval accuracy on unseen keys; also on the prompts where a distractor's key ends in the needle key's
        last letter ("near"), where a model that matched only the token before the colon would fail. With
        ``within``, also on the needles at most that many tokens before the question (about (1 - depth) x seq):
        a model that retrieves by distance keeps those beyond its trained length; one that collapses with length
        loses them too."""
        needle = NeedleConfig(lengths=(seq,), num_samples=a.eval_samples, rnd_number_digits=a.digits,
                              num_distractor=facts - 1, task="kv", key_length=a.key_length)
        if seq not in haystacks:
            haystacks[seq] = load_haystack(tok, 2 * seq, seed=needle.seed)
        hay = haystacks[seq]
        model.eval()
        ok, near, near_ok, close, close_ok = 0, 0, 0, 0, 0
        for s in range(needle.num_samples):
            key, value, others = needle.needles(s)
            rng = random.Random(s)
            depth = rng.random()
            p = build_prompt(tok, hay, context_length=seq, depth=depth, number=value, distractors=others,
                             distractor_depths=[rng.random() for _ in others], city=key, boundaries=boundaries,
                             task=NEEDLE_TASKS["kv"])
            with autocast:
                logits = model(torch.tensor([p.input_ids], device=device)).logits[0]
            pred = logits[p.answer_start - 1:p.answer_start - 1 + len(p.answer_ids)].argmax(-1).cpu()
            hit = int((pred == torch.tensor(p.answer_ids)).all())
            ok += hit
            if any(k[-1] == key[-1] for k, _ in others):
                near, near_ok = near + 1, near_ok + hit
            if (1 - depth) * seq <= within:
                close, close_ok = close + 1, close_ok + hit
        model.train()
        within_ = {"within": close, "accuracy_within": round(close_ok / close, 3) if close else None}
        return {"accuracy": ok / needle.num_samples, "near": near,
                "accuracy_near": round(near_ok / near, 3) if near else None, **(within_ if within else {})}

    t0, step = time.time(), 0
    for stage, (seg, per_row, facts, steps, near_share) in enumerate(stages):
        seq = seg * per_row
        segments = fact_rows(tok, num_rows=steps * a.batch * per_row, seq_length=seg, split="train",
                             num_facts=facts, num_questions=facts, key_length=a.key_length, value_digits=a.digits,
                             other_labels=a.other_labels, near_keys=near_share, seed=7 + stage)
        for _ in range(steps):
            step += 1
            parts = [[next(segments) for _ in range(per_row)] for _ in range(a.batch)]
            batch = [{k: [t for part in row for t in part[k]] for k in ("input_ids", "labels")} for row in parts]
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, step / 50)
            ids, labels = (torch.tensor([r[k] for r in batch], device=device) for k in ("input_ids", "labels"))
            with autocast:
                loss = model(ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if step % a.eval_every == 0:
                beyond = {}
                for x in a.eval_beyond:  # accuracy at x times the length, and on its needles within the length
                    r = accuracy(x * seq, facts, within=seq)
                    beyond |= {f"accuracy_x{x}": r["accuracy"], f"accuracy_x{x}_within": r["accuracy_within"]}
                print(json.dumps({"step": step, "seq": seq, "facts": facts, "loss": round(loss.item(), 3),
                                  **accuracy(seq, facts), **beyond, "s": round(time.time() - t0)}), flush=True)
                if a.seconds and time.time() - t0 > a.seconds:
                    return


if __name__ == "__main__":
    main()
