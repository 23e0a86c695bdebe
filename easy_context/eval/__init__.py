"""Long-context evaluation under sequence parallelism: needle-in-a-haystack and perplexity.

``needle`` and ``ppl`` hold the logic of ``eval_needle.py`` / ``eval_ppl.py`` / ``plot.py``; ``haystack`` makes
essay-like text in code; ``facts`` is the needle demo's key -> value task (its training rows and disjoint key
spaces); ``tiny`` makes small tokenizers and models; ``common`` loads models and sets up the process group.
Importing does nothing.
"""
