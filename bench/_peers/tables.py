"""bench/peers.py's markdown tables: a row per result, with a "vs best peer" column (the best correct peer's
time / this row's: above 1 = faster than every correct peer)."""
from __future__ import annotations


def _size(s: int) -> str:
    return f"{s // 1024}K" if s % 1024 == 0 else str(s)


def _is_peer(name: str) -> bool:
    return name.startswith(("torch_cp_", "ds_"))


def best_peer(rows: list[dict], s: int, key: str, higher: bool):
    """The best value of ``key`` among the peers' rows at length ``s`` that ran and were not WRONG."""
    vals = [r[key] for r in rows if r["S"] == s and _is_peer(r["method"]) and key in r and r.get("check") != "WRONG"]
    return (max if higher else min)(vals) if vals else None


def _table(columns: list[str], rows: list[dict], done: str, cells) -> str:
    """A markdown table, a row per result: ``cells(row)`` for rows that have ``done``; a skip or error note else."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        head = f"| {_size(r['S'])} | {r['method']} |"
        if done not in r:
            what = "skipped" if "skipped" in r else "error"
            out.append(f"{head} {what}: {str(r.get(what))[:90]} |" + " |" * (len(columns) - 3))
        else:
            out.append(f"{head} {cells(r)} |")
    return "\n".join(out)


def attn_table(rows: list[dict]) -> str:
    def cells(r):
        best = best_peer(rows, r["S"], "ms_fwdbwd", higher=False)
        vs = f"{best / r['ms_fwdbwd']:.2f}" if best and r["method"] != "single" else ""
        e = r.get("err")
        errs = "/".join(f"{e[n]:.1e}" for n in ("out", "dq", "dk", "dv")) if e else ""
        peak = r.get("peak_extra_GiB_per_rank")
        return (f"{r['ms_fwd']:.1f} | {r['ms_fwdbwd']:.1f} | {r['tflops_per_rank_fwdbwd']:.0f} | "
                f"{r.get('eff_fwdbwd', '')} | {max(peak) if peak else ''} | {errs} | {r.get('check', '')} | {vs}")

    return _table(["S", "method", "fwd ms", "fwd+bwd ms", "TFLOP/s/rank fwd+bwd", "eff fwd+bwd", "peak extra GiB",
                   "rel err out/dq/dk/dv", "check", "vs best peer"], rows, "ms_fwdbwd", cells)


def step_table(rows: list[dict]) -> str:
    def cells(r):
        best = best_peer(rows, r["S"], "tok_per_s", higher=True)
        vs = f"{r['tok_per_s'] / best:.2f}" if best else ""
        peak = r.get("peak_GiB_per_rank")
        return (f"{r['s_per_step']} | {r['tok_per_s']} | {r['tflops_per_gpu']} | {r['mfu']} | "
                f"{max(peak) if peak else ''} | {r['loss']:.5f} | {r['gnorm_q0']:.4e} | {r.get('check', '')} | {vs}")

    return _table(["S", "method", "s/step", "tokens/s", "TFLOP/s/GPU", "MFU", "peak GiB (max rank)", "loss",
                   "gnorm q0", "check", "vs best peer"], rows, "s_per_step", cells)
