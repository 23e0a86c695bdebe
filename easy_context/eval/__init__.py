"""Long-context evaluation under sequence parallelism: needle-in-a-haystack and perplexity.

``needle`` (prompts and answers) with ``needle_grid`` (the grid, its results and heatmap) and ``ppl`` hold the logic
of ``eval_needle.py`` / ``eval_ppl.py`` / ``plot.py``; ``haystack`` makes essay-like text in code; ``facts`` is the
``kv`` task's format and disjoint key spaces (the needle demo, ``examples/needle_demo``, trains on it); ``tiny``
makes small tokenizers and models; ``common`` loads models and sets up the process group. Importing does nothing.
"""
