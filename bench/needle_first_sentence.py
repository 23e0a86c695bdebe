"""Why did the needle demo's extended model miss the needle at depth 0, and only there (bench/RESULTS.md 15c, 16a)?

At depth 0 eval_needle.py put the needle right after the prompt's prefix and before the haystack's first word, which
has no space before it: ``"Facts:\\n FIK: 884.On Ideas..."`` (until 2026-11-30; now ``"884. On"``, as a fact reads
where a training row's window starts at a sentence boundary). This scores, per context length and with the eval's
own needles, distractors and distractor depths, the depth-0 prompt three ways, and depth 10% for reference:

* ``glued``: the old prompt (the space after the needle taken out: one token shorter);
* ``as_eval``: eval_needle.py's prompt now: only the glued word differs;
* ``second``: the needle after the haystack's first sentence instead: the position differs, not the format.

If ``as_eval`` recovers what ``glued`` misses, the miss was the prompt's format; if only ``second`` does, it is the
first positions of the context (the answer on 2 x H200, RESULTS 16a: only ``second`` did, and packed 64K rows
fixed it). One process, the whole sequence on one device:

    python bench/needle_first_sentence.py --model runs/needle_demo/stage3_65536 --lengths 256 1024 4096 65536
"""
import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from easy_context.eval.common import load_model  # noqa: E402
from easy_context.eval.haystack import load_haystack  # noqa: E402
from easy_context.eval.needle import NEEDLE_TASKS, NeedleConfig, SentenceBoundaries, answer_predictions, build_prompt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    # the demo's evaluation (train_scripts/needle_demo.sh): the same flags give the same needles and distractors
    for flag, default in (("key-length", 3), ("digits", 3), ("distractors", 4), ("samples", 4), ("seed", 24242424)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(a.model, "data_parallel", device)
    config = NeedleConfig(num_samples=a.samples, num_distractor=a.distractors, task="kv", key_length=a.key_length,
                          rnd_number_digits=a.digits, seed=a.seed)
    task, boundaries = NEEDLE_TASKS["kv"], SentenceBoundaries(tok)
    hay = load_haystack(tok, max(a.lengths), seed=config.seed)
    space = tok(" ", add_special_tokens=False)["input_ids"]

    def score(length: int, depth: float, rng_depth: float, glued: bool = False) -> tuple[int, list[str]]:
        """Hits and predictions over the samples; the distractor depths are the eval's for depth ``rng_depth``."""
        hits, preds = 0, []
        for s in range(config.num_samples):
            key, number, distractors = config.needles(s)
            rng = random.Random(f"{config.seed}-{length}-{rng_depth}-{s}")  # as eval_needle.py draws them
            p = build_prompt(tok, hay, context_length=length, depth=depth, number=number, distractors=distractors,
                             distractor_depths=[rng.random() for _ in distractors], city=key, boundaries=boundaries,
                             task=task)
            ids, start, end = p.input_ids, p.answer_start, p.needle_span[1]
            if glued and ids[end:end + len(space)] == space:  # the space build_prompt puts after a needle at 0
                ids, start = ids[:end] + ids[end + len(space):], start - len(space)
            pred = answer_predictions(model, torch.tensor([ids]), start, len(p.answer_ids),
                                      seq_algo="data_parallel", device=device).cpu()
            hits += int((pred == torch.tensor(p.answer_ids)).all())
            preds.append(tok.decode(pred.tolist()))
        return hits, preds

    for n in a.lengths:
        glued, predicted = score(n, 0.0, 0.0, glued=True)
        # depth 2/n: int(room * depth) = 1 for any room in [n/2, n), so the needle goes to the first boundary after 0
        row = {"length": n, "samples": config.num_samples, "glued": glued, "predicted_glued": predicted,
               "as_eval": score(n, 0.0, 0.0)[0], "second": score(n, 2 / n, 0.0)[0], "depth10": score(n, 0.1, 0.1)[0]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
