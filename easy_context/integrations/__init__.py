"""Everything that touches transformers: how transformers reaches easy_context and how easy_context changes a
transformers model. Nothing outside this folder (and the training / eval layers above it) imports transformers at
module level, and easy_context.attention / easy_context.memory never import it or this folder.

* hf.py: the sequence-parallel attention registered with ``AttentionInterface`` (per model or per model type), the
  exact ``labels=`` loss, the check that shards reach a sequence-parallel model;
* memory.py: easy_context.memory's mechanisms applied to a model (decoder layers, offloaded and
  attention-preserving checkpointing, tiled MLP);
* patch.py: the fused RMSNorm / SwiGLU / rotary ops swapped into a model's modules after a numerical check;
* trainer.py: ``prepare_trainer``, any transformers ``Trainer`` (TRL's ``SFTTrainer``, a PEFT model) on exact
  sequence parallelism;
* models.py: configurations (the one preset table) and model loading, shared by training, evaluation and advise.

Submodules load on first use (importing this package imports nothing of transformers).
"""
