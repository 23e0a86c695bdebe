"""Long-context evaluation under sequence parallelism: needle-in-a-haystack and perplexity.

``needle`` and ``ppl`` hold the logic of ``eval_needle.py`` / ``eval_ppl.py`` / ``plot.py``; ``haystack`` makes
essay-like text in code; ``common`` loads models and sets up the process group. Importing does nothing.
"""
