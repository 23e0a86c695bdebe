"""bench/peers.py's parts, one module per concern (peers.py is the command line and has the documentation):

* ``common.py``: the method names, where this process runs (``Env``: device, rank, timing, memory), the helpers every
  method shares (SDPA backend choice, importing a peer or skipping it, DeepSpeed's group, gathering rows).
* ``attn_methods.py`` / ``attn.py``: attention: one context manager per method (easy_context, torch context
  parallel, DeepSpeed Ulysses) / inputs, the exact reference, the yardstick, the verdict and the runner.
* ``step_methods.py`` / ``step.py``: one training step: one class per method (setup -> step -> teardown) / the
  model, the batch, the one-GPU reference, the verdict and the runner.
* ``tables.py``: the markdown tables with the "vs best peer" column.

The modules import ``_profile``, ``modes`` and ``packed_attn`` from bench/, which must be on ``sys.path`` (peers.py
puts it there).
"""
