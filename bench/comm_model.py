"""Communication model for the sequence-parallel attention: bytes each rank sends per ring step (and per Ulysses
all-to-all) against the compute time of that step, and the link bandwidth needed to hide the transfer.

    python bench/comm_model.py bench/results/attention.json [--machine h200x2 | --link-GBps 450]
    python bench/comm_model.py --step [--seq 262144] [--world 2] [--layers 32] [--keep] [--machine h200x2]

Table mode (a bench/attention.py result file): per measured per-rank schedule (zigzag / usp, W >= 2), the bytes of
one ring step, its compute time, the bandwidth that would hide it and the predicted efficiency.
zigzag / usp ring step, forward: K and V of the local shard (bf16). Backward: K, V again plus dK, dV in
float32 travelling with them. dist_flash moves one K/V (or query) block per step plus a partial result.
Efficiency when not hidden: compute / max(compute, comm) per step (comm overlapped with compute).

Step mode (``--step``): the predicted overlap of compute and communication, ring step by ring step, for one
training step of a Llama-2-7B-shaped model (gradient checkpointing: every layer runs the attention forward twice
unless ``--keep``) on W GPUs, to be checked against a measured step (bench/peers.py). It follows the schedules of
easy_context/attention/ring.py: the forward posts the next K/V block before computing the current one
(W-1 transfers); the backward does the same and also passes the block's float32 dK/dV on after computing it, so
during step s > 0 the K/V and the previous step's dK/dV are in flight together, and the last dK/dV hop (back to the
block's owner) has no compute left to hide behind. Ulysses' all-to-alls (q, k, v to head shards and the output
back; in the backward dout, then dq, dk, dv) sit between the projections and the attention: nothing hides them.
Per-rank attention compute comes from ``--attention`` (bench/attention.py's rows: the zigzag schedule at (S, W),
one GPU's cuDNN call / W for Ulysses) or, without a matching row, from ``--attn-tflops``; the MLP/projection
matmuls from ``--dense-tflops`` (670: bench/RESULTS.md 7b, 4 layers at 128K, 1.26 s of matmuls counting the
recompute); elementwise kernels, launch gaps and the loss's softmax are not modelled.

Links (``--machine``): ``h200x2`` (default) = the lent 2 x H200 (NVLink NV18) as measured on 2026-11-29
(../shared/GPU-NOTES.md): ring p2p (batch_isend_irecv, both directions at once) 243 / 345 / 359 GB/s per direction and
all_to_all_single 229 / 286 / 330 GB/s at 64 MiB / 512 MiB / 2 GiB messages; a message's bandwidth is interpolated in
log(size) between those points (the end values beyond them). ``h200-spec`` = 450 GB/s flat (NVLink's nominal
per-direction figure, this model's first assumption). ``--link-GBps X``: X flat for p2p and all-to-all.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class Link:
    """Bandwidth (GB/s per direction) by message size: (bytes, GB/s) points, log-interpolated, flat beyond."""
    name: str
    p2p: tuple[tuple[int, float], ...]
    a2a: tuple[tuple[int, float], ...]

    @staticmethod
    def _at(points, nbytes: float) -> float:
        sizes = [s for s, _ in points]
        i = bisect.bisect_left(sizes, nbytes)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (s0, b0), (s1, b1) = points[i - 1], points[i]
        f = (math.log(nbytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return b0 + f * (b1 - b0)

    def p2p_GBps(self, nbytes: float) -> float:
        return self._at(self.p2p, nbytes)

    def a2a_GBps(self, nbytes: float) -> float:
        return self._at(self.a2a, nbytes)

    def label(self) -> str:
        flat = len(self.p2p) == 1 and self.p2p == self.a2a
        return f"{self.p2p[0][1]:.0f} GB/s" if flat else self.name


def flat_link(gbps: float, name: str | None = None) -> Link:
    return Link(name or f"{gbps:.0f} GB/s", ((1, gbps),), ((1, gbps),))


MACHINES = {
    "h200x2": Link("h200x2 (measured NVLink)", ((64 * MIB, 243.0), (512 * MIB, 345.0), (2048 * MIB, 359.0)),
                   ((64 * MIB, 229.0), (512 * MIB, 286.0), (2048 * MIB, 330.0))),
    "h200-spec": flat_link(450.0, "h200-spec"),
}
DEFAULT_MACHINE = "h200x2"
LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
HEAD_DIM = 128


def table(rows: list[dict], link: Link) -> list[str]:
    """The per-schedule table of a bench/attention.py result list (markdown lines)."""
    out = [f"| S | heads q/kv | algo | W | fwd MB/step | fwd ms/step | fwd GB/s needed | bwd MB/step | bwd ms/step | "
           f"bwd GB/s needed | predicted eff. at {link.label()} |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] not in ("zigzag_ring_attn", "usp_attn") or r["W"] < 2:
            continue
        s, w, hkv, d = r["S"], r["W"], r["KV"], HEAD_DIM
        ring, uly = (2, w // 2) if r["what"] == "usp_attn" else (w, 1)
        local = s // ring  # tokens of one ring position's shard (after the Ulysses all-to-all for usp)
        kv_heads = max(hkv // uly, 1)
        kv_bytes = 2 * local * kv_heads * d * 2  # K and V, bf16
        fwd_mb, bwd_mb = kv_bytes / 1e6, 3 * kv_bytes / 1e6  # bwd: K,V + fp32 dK,dV
        t_f = r["t_fwd"] / ring
        t_b = (r["t_fb"] - r["t_fwd"]) / ring
        need_f, need_b = fwd_mb / 1e3 / t_f, bwd_mb / 1e3 / t_b
        per_tensor = kv_bytes / 2  # K and V travel as two messages
        comm_f = fwd_mb / 1e3 / link.p2p_GBps(per_tensor)
        comm_b = bwd_mb / 1e3 / link.p2p_GBps(per_tensor)
        eff = (t_f + t_b) / (max(t_f, comm_f) + max(t_b, comm_b))
        out.append(f"| {s // 1024}K | {r['H']}/{hkv} | {r['what']} | {w} | {fwd_mb:.0f} | {t_f * 1e3:.2f} | "
                   f"{need_f:.0f} | {bwd_mb:.0f} | {t_b * 1e3:.2f} | {need_b:.0f} | {eff:.2f} |")
    return out


# ---------------------------------------------------------------- step mode


def attention_compute(rows: list[dict] | None, s: int, w: int, heads: int, kv_heads: int, attn_tflops: float):
    """Per-rank attention seconds of one layer: {zigzag: (fwd, fwd+bwd), ulysses: (fwd, fwd+bwd)}, and the source."""
    flops_f = 2.0 * s * s * heads * HEAD_DIM / w  # causal forward per rank
    model = (flops_f / (attn_tflops * 1e12), 3.5 * flops_f / (attn_tflops * 1e12))
    out = {"zigzag": model, "ulysses": model}
    src = {"zigzag": f"{attn_tflops:.0f} TFLOP/s", "ulysses": f"{attn_tflops:.0f} TFLOP/s"}
    for r in rows or []:
        if r.get("S") != s or r.get("H") != heads or r.get("KV") != kv_heads:
            continue
        if r["what"] == "zigzag_ring_attn" and r["W"] == w:
            out["zigzag"], src["zigzag"] = (r["t_fwd"], r["t_fb"]), "measured per-rank schedule (attention.json)"
        if r["what"] == "single cudnn":  # Ulysses: each rank runs the whole sequence for H/W heads
            out["ulysses"] = (r["t_fwd"] / w, r["t_fb"] / w)
            src["ulysses"] = "measured one-GPU cuDNN / W (attention.json)"
    return out, src


def ring_schedule(t_fwd: float, t_fb: float, w: int, kv_bytes: float, link: Link) -> dict:
    """Compute vs transfer of each ring step of one layer's attention (fwd, bwd) for one rank, in seconds."""
    bw = link.p2p_GBps(kv_bytes / 2) * 1e9  # K and V (and dK, dV) travel as separate messages
    kv, dkv = kv_bytes / bw, 2 * kv_bytes / bw  # dK/dV in float32: twice K/V's bytes
    c_f, c_b = t_fwd / w, (t_fb - t_fwd) / w
    fwd = [(c_f, kv if i + 1 < w else 0.0) for i in range(w)]
    bwd = [(c_b, (kv if i + 1 < w else 0.0) + (dkv if i > 0 else 0.0)) for i in range(w)]
    bwd.append((0.0, dkv))  # the last dK/dV hop to the block's owner: nothing left to compute
    exposed = lambda steps: sum(max(0.0, t - c) for c, t in steps)  # noqa: E731
    return dict(fwd=fwd, bwd=bwd, exposed_fwd=exposed(fwd), exposed_bwd=exposed(bwd), bw_GBps=bw / 1e9,
                kv_bytes=kv_bytes)


def predict_step(s: int, w: int, layers: int, keep: bool, link: Link, rows: list[dict] | None,
                 attn_tflops: float = 550.0, dense_tflops: float = 670.0, shape: dict = LLAMA2_7B) -> dict:
    """Predicted per-rank times (seconds) of one forward+backward at ``s`` tokens on ``w`` GPUs."""
    h, hkv, hidden = shape["heads"], shape["kv_heads"], shape["hidden"]
    attn, src = attention_compute(rows, s, w, h, hkv, attn_tflops)
    passes_fwd = 1 if keep else 2  # gradient checkpointing: the recompute runs the attention forward again
    kv_bytes = 2 * (s // w) * hkv * HEAD_DIM * 2  # K and V of the local shard, bf16
    ring = ring_schedule(*attn["zigzag"], w, kv_bytes, link)
    # Ulysses: each all_to_all_single moves (W-1)/W of a (S/W, heads, D) bf16 tensor per rank, nothing overlaps
    q_bytes, kv_t = (s // w) * h * HEAD_DIM * 2, (s // w) * hkv * HEAD_DIM * 2
    a2a = lambda n: n * (w - 1) / w / (link.a2a_GBps(n) * 1e9)  # noqa: E731
    uly_fwd = 2 * a2a(q_bytes) + 2 * a2a(kv_t)  # q, k, v in; the output back
    uly_bwd = 2 * a2a(q_bytes) + 2 * a2a(kv_t)  # dout in; dq, dk, dv back
    per_layer_linear = 2 * hidden * hidden + 2 * hidden * hidden * hkv // h + 3 * hidden * shape["intermediate"]
    tokens = s / w
    # forward, recompute forward (with --keep too: it skips only the attention), backward; the LM head once
    dense_flops = 8 * per_layer_linear * tokens * layers + 6 * shape["vocab"] * hidden * tokens
    dense = dense_flops / (dense_tflops * 1e12)
    out = {"ring": ring, "src": src, "dense": dense}
    for algo in ("zigzag", "ulysses"):
        t_f, t_fb = attn[algo]
        compute = layers * (passes_fwd * t_f + (t_fb - t_f))
        comm = (layers * (passes_fwd * ring["exposed_fwd"] + ring["exposed_bwd"]) if algo == "zigzag"
                else layers * (passes_fwd * uly_fwd + uly_bwd))
        out[algo] = dict(attention=compute, exposed_comm=comm, step=compute + dense + comm)
    out["ulysses"]["per_layer_fwd_comm"], out["ulysses"]["per_layer_bwd_comm"] = uly_fwd, uly_bwd
    return out


def step_report(s: int, w: int, layers: int, keep: bool, link: Link, rows, attn_tflops: float,
                dense_tflops: float) -> list[str]:
    p = predict_step(s, w, layers, keep, link, rows, attn_tflops, dense_tflops)
    ring = p["ring"]
    size = f"{s // 1024}K" if s % 1024 == 0 else str(s)
    lines = [f"Predicted one training step: Llama-2-7B shape, {layers} layers, {size} tokens on {w} GPUs, link "
             f"{link.name} (ring p2p {ring['bw_GBps']:.0f} GB/s at {ring['kv_bytes'] / 2 / 1e9:.2f} GB messages), "
             f"gradient checkpointing{' with attention preserved (no recompute forward)' if keep else ''}.",
             f"Attention compute per rank: zigzag from {p['src']['zigzag']}; Ulysses from {p['src']['ulysses']}.",
             "", "Zigzag ring, one layer, one rank (a forward pass runs "
             f"{1 if keep else 2}x per step, the backward once):", "",
             "| pass | ring step | compute ms | in flight MB | transfer ms | transfer / compute | exposed ms |",
             "|---|---|---|---|---|---|---|"]
    bw = ring["bw_GBps"] * 1e9
    for name in ("fwd", "bwd"):
        for i, (c, t) in enumerate(ring[name]):
            step = "last dK/dV hop" if name == "bwd" and i == w else str(i)
            ratio = f"{t / c:.3f}" if c > 0 else "-"
            lines.append(f"| {name} | {step} | {c * 1e3:.2f} | {t * bw / 1e6:.0f} | {t * 1e3:.2f} | {ratio} | "
                         f"{max(0.0, t - c) * 1e3:.2f} |")
    lines += ["", "| algorithm | attention compute s | dense matmuls s | exposed communication s | predicted step s | "
              "communication share |", "|---|---|---|---|---|---|"]
    for algo in ("zigzag", "ulysses"):
        r = p[algo]
        lines.append(f"| {algo} | {r['attention']:.2f} | {p['dense']:.2f} | {r['exposed_comm']:.3f} | "
                     f"{r['step']:.2f} | {r['exposed_comm'] / r['step']:.2%} |")
    lines += ["", f"Ulysses all-to-alls per layer: forward {p['ulysses']['per_layer_fwd_comm'] * 1e3:.2f} ms, backward "
              f"{p['ulysses']['per_layer_bwd_comm'] * 1e3:.2f} ms (not overlapped). Dense matmuls at "
              f"{dense_tflops:.0f} TFLOP/s; elementwise kernels not modelled (the predicted step is a lower bound).",
              f"Check on the GPUs: `torchrun --nproc_per_node {w} bench/peers.py step --seqs {s} --layers {layers} "
              "--methods ec_zigzag ec_ulysses` (s/step against 'predicted step s'), and `... bench/peers.py attn "
              f"--seqs {s} --methods single ec_zigzag ec_ulysses` (ec_zigzag's fwd+bwd ms per rank against "
              f"{sum(c for c, _ in ring['fwd']) * 1e3:.0f} + {sum(c for c, _ in ring['bwd']) * 1e3:.0f} ms of compute "
              f"+ {(ring['exposed_fwd'] + ring['exposed_bwd']) * 1e3:.1f} ms exposed)."]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="ring / Ulysses communication vs compute (see the module docstring)")
    p.add_argument("results", nargs="?", help="bench/attention.py's JSON (table mode)")
    p.add_argument("--machine", default=DEFAULT_MACHINE, choices=list(MACHINES), help="link preset")
    p.add_argument("--link-GBps", type=float, default=None, help="flat per-direction bandwidth instead of --machine")
    p.add_argument("--step", action="store_true", help="predict the overlap of one Llama-2-7B training step")
    p.add_argument("--seq", type=int, default=262144)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="attention-preserving checkpointing: no recompute forward")
    p.add_argument("--attention", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "attention.json"),
                   help="step mode: measured per-rank attention (bench/attention.py) where it has the shape")
    p.add_argument("--attn-tflops", type=float, default=550.0, help="step mode: attention rate without a measured row")
    p.add_argument("--dense-tflops", type=float, default=670.0, help="step mode: matmul rate of projections and MLP")
    a = p.parse_args(argv)
    link = flat_link(a.link_GBps) if a.link_GBps else MACHINES[a.machine]
    if a.step:
        rows = json.load(open(a.attention)) if a.attention and os.path.exists(a.attention) else None
        print("\n".join(step_report(a.seq, a.world, a.layers, a.keep, link, rows, a.attn_tflops, a.dense_tflops)))
        return
    if not a.results:
        p.error("give a bench/attention.py result file (table mode) or --step")
    print("\n".join(table(json.load(open(a.results)), link)))


if __name__ == "__main__":
    main()
