"""One W=1 training step's numbers (loss, gradient norm, a few gradient entries) on a Llama-2-7B-shaped model with few
layers, for comparing two trees of easy_context on the same GPU: a restructuring must leave them unchanged.

    python bench/step_fingerprint.py --tree /path/to/old/checkout --tree . --modes "ec+fuse+keep@cudnn ec@fa4"

Each (tree, mode) runs in its own subprocess with that tree first on sys.path (its easy_context and its bench/modes.py,
bench/train_step.py). Every case runs twice, so the kernels' own run-to-run spread (atomics in the backward) is
printed next to the difference between trees. Prints one JSON line per run and a table last.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, torch
import torch.distributed as dist
tree, mode, seq, layers, packed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path[:0] = [tree + "/bench", tree]
import train_step
if packed != "-":
    train_step.PACKED = tuple(int(x) for x in packed.split(":"))
tmp = tempfile.mkdtemp()  # a world of one rank: the registered attention needs a group
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{tmp}/rdzv", rank=0,
                        world_size=1)
if not torch.cuda.is_available():  # a CPU check of the script itself: a tiny model
    train_step.DEV = "cpu"
model = train_step.build(layers, tiny=not torch.cuda.is_available())
train_step.configure(model, mode)
out = []
for rep in range(2):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = train_step.step(model, mode.partition("@")[0], seq)
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
    probe = [float(g.flatten()[:: max(1, g.numel() // 3)][:3].sum()) for g in grads[:: max(1, len(grads) // 6)]]
    out.append(dict(loss=loss, grad_norm=norm, probe=probe))
import easy_context
print("RESULT " + json.dumps(dict(tree=tree, module=easy_context.__file__, mode=mode, seq=seq, runs=out)))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, help="a checkout of easy_context (give two)")
    p.add_argument("--modes", default="ec+fuse+keep@cudnn ec+fuse+keep@fa4", help="bench/train_step.py modes")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--packed", default="-", help="MIN:MAX document lengths (bench/train_step.py --packed), or -")
    a = p.parse_args()
    rows = []
    for mode in a.modes.split():
        for tree in a.tree:
            tree = os.path.abspath(tree)
            env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
            r = subprocess.run([sys.executable, "-c", CHILD, tree, mode, str(a.seq), str(a.layers), a.packed],
                               env=env, capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"FAIL {tree} {mode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", flush=True)
                sys.exit(1)
            row = json.loads(line[0][7:])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| mode | tree | loss (run 1, run 2) | grad norm (run 1, run 2) | max rel. diff vs first tree |")
    print("|---|---|---|---|---|")
    for mode in a.modes.split():
        base = None
        for row in (r for r in rows if r["mode"] == mode):
            r1, r2 = row["runs"]
            if base is None:
                base, diff = r1, "-"
            else:
                vals = [(r1["loss"], base["loss"]), (r1["grad_norm"], base["grad_norm"])]
                vals += list(zip(r1["probe"], base["probe"]))
                diff = f"{max(abs(x - y) / max(abs(y), 1e-30) for x, y in vals):.2e}"
            spread = [(r1["loss"], r2["loss"]), (r1["grad_norm"], r2["grad_norm"])]
            spread += list(zip(r1["probe"], r2["probe"]))
            rep = max(abs(x - y) / max(abs(y), 1e-30) for x, y in spread)
            print(f"| {mode} | {row['tree']} | {r1['loss']:.6f}, {r2['loss']:.6f} | {r1['grad_norm']:.6f}, "
                  f"{r2['grad_norm']:.6f} | {diff} (run-to-run {rep:.2e}) |")


if __name__ == "__main__":
    main()
