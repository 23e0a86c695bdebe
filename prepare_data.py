"""Tokenise a local corpus and pack it into fixed-length ``input_ids`` samples for ``train.py --dataset``.

    python prepare_data.py --input corpus.jsonl --tokenizer path/to/tokenizer --seq-length 65536 \
        --output-dir data/corpus_64k

Each document becomes [BOS] + tokens + [EOS] (--no-bos / --no-eos to drop them); documents are concatenated and
cut into --seq-length chunks, the last partial chunk dropped (details: easy_context/data.py).
"""
from easy_context.data import main

if __name__ == "__main__":
    main()
