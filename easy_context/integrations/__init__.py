"""How other frameworks reach easy_context: transformers through its AttentionInterface (hf.py)."""
