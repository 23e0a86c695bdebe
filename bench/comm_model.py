"""Communication model for the rings: bytes each rank sends per ring step vs the measured compute time of
that step (bench/attention.py's per-rank schedule), and the link bandwidth needed to hide the transfer.

    python bench/comm_model.py bench/results/attention.json [--link-GBps 450]

zigzag / usp ring step, forward: K and V of the local shard (bf16). Backward: K, V again plus dK, dV in
float32 travelling with them. dist_flash moves one K/V (or query) block per step plus a partial result.
Efficiency when not hidden: compute / max(compute, comm) per step (comm overlapped with compute).
"""
import argparse
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--link-GBps", type=float, default=450.0, help="per-direction link bandwidth (H200 NVLink ~450)")
    a = p.parse_args()
    rows = json.load(open(a.results))
    print(f"| S | heads q/kv | algo | W | fwd MB/step | fwd ms/step | fwd GB/s needed | bwd MB/step | bwd ms/step | "
          f"bwd GB/s needed | predicted eff. at {a.link_GBps:.0f} GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["what"] not in ("zigzag_ring_attn", "usp_attn") or r["W"] < 2:
            continue
        s, w, hkv, d = r["S"], r["W"], r["KV"], 128
        ring, uly = (2, w // 2) if r["what"] == "usp_attn" else (w, 1)
        local = s // ring  # tokens of one ring position's shard (after the Ulysses all-to-all for usp)
        kv_heads = max(hkv // uly, 1)
        kv_bytes = 2 * local * kv_heads * d * 2  # K and V, bf16
        fwd_mb, bwd_mb = kv_bytes / 1e6, 3 * kv_bytes / 1e6  # bwd: K,V + fp32 dK,dV
        t_f = r["t_fwd"] / ring
        t_b = (r["t_fb"] - r["t_fwd"]) / ring
        need_f, need_b = fwd_mb / 1e3 / t_f, bwd_mb / 1e3 / t_b
        comm_f, comm_b = fwd_mb / 1e3 / a.link_GBps, bwd_mb / 1e3 / a.link_GBps
        eff = (t_f + t_b) / (max(t_f, comm_f) + max(t_b, comm_b))
        print(f"| {s // 1024}K | {r['H']}/{hkv} | {r['what']} | {w} | {fwd_mb:.0f} | {t_f * 1e3:.2f} | {need_f:.0f} | "
              f"{bwd_mb:.0f} | {t_b * 1e3:.2f} | {need_b:.0f} | {eff:.2f} |")


if __name__ == "__main__":
    main()
