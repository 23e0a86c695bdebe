"""Applications built on easy_context, run from the repository root (``python -m examples.<name>``); not part of
the installed package, and nothing in ``easy_context`` imports them."""
