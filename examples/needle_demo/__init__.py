"""The needle demo's own steps (``train_scripts/needle_demo.sh`` runs them around train.py, eval_needle.py,
eval_ppl.py and plot.py): ``prepare`` writes the tokenizer, the untrained model, the corpora and the leak check;
``summary`` reads the evaluations' output files and states the demo's goals against them; ``publish`` copies the
images and numbers into one folder with a report of them (README.md), for ``docs/``.

    python -m examples.needle_demo record --output-dir runs/needle_demo --stages "0 1 2" --settings SHORT ...
    python -m examples.needle_demo prepare --output-dir runs/needle_demo [sizes ...]
    python -m examples.needle_demo summary --output-dir runs/needle_demo --short-length 256 --long-length 65536
    python -m examples.needle_demo publish --output-dir runs/needle_demo --to docs/needle_demo

``prepare`` writes under ``--output-dir``:

* ``init/``: a random Llama of the given shape with the byte tokenizer (``make_tokenizer("bytes")``: token id = byte
  value, ``<s>`` = 256, ``</s>`` = 257), a ``--model`` folder for train.py and the evaluations;
* ``data/train_short``, ``data/train_mid`` (with ``--mid-rows``), ``data/train_long``: ``save_to_disk`` rows of
  :func:`~examples.needle_demo.rows.fact_rows` (``input_ids`` and ``labels``; the long rows also ``position_ids``
  with ``--long-packed``) from the *train* key space; ``data/ppl``: documents for eval_ppl.py from the *eval* key
  space (``input_ids`` without BOS: eval_ppl adds it per window);
* ``data/leak_check.json``: every run of capitals in the decoded training rows against every key eval_needle.py
  will ask (the needles and distractors of ``--eval-samples``/``--eval-distractors``/``--eval-seed``) and every key
  of the perplexity documents; any overlap stops the demo (exit status 1).

``record`` writes ``run.json``: the date, the device, the commit and the script's settings (``--settings``: the
names of the environment variables it exported), and each later invocation's stages and changed settings.

Nothing here reads a number written by hand: ``summary`` computes everything from ``results.json`` / the CSVs.

An application of the package, not part of it (``easy_context`` never imports it; run from the repository root):
``rows`` makes the training rows of the ``kv`` task (:mod:`easy_context.eval.facts`: its key spaces and format,
shared with ``eval_needle.py --task kv``); ``prepare`` writes the data and the leak check; ``report`` keeps the run's
record, its summary and the published report; ``__main__`` holds the flags. Importing does nothing.
"""
