"""Tokenise a local corpus (plain text, or SFT examples) and pack it into fixed-length samples for
``train.py --dataset``.

    python prepare_data.py --input corpus.jsonl --tokenizer path/to/tokenizer --seq-length 65536 \
        --output-dir data/corpus_64k [--packing documents]
    python prepare_data.py --input sft.jsonl --tokenizer path/to/tokenizer --seq-length 65536 \
        --output-dir data/sft_64k --sft [--prompt-column prompt --response-column response | --messages-column messages]

Each document becomes [BOS] + tokens + [EOS] (--no-bos / --no-eos to drop them) and the documents fill
--seq-length rows in order; the last partial row is dropped. --packing stream (the default) writes input_ids only:
documents that share a row attend to each other. --packing documents also writes position_ids that restart at 0 at
every document (and every row; a document cut at a row end continues in the next row from 0), so train.py
(--packing auto) keeps each document to itself and never trains a target across a document boundary; no token is
spent on padding.

--sft (implies --packing documents): one example is one document, and rows also carry labels: -100 on the prompt
(BOS, system/user turns, the chat template's headers), the token's id on the response (assistant turns, the EOS or
end-of-turn marker). Examples come from --prompt-column / --response-column text (default prompt / response), or
from a messages column of {"role", "content"} lists rendered with the tokenizer's chat template (used when the input
has a "messages" column or --messages-column is given; the template does all framing). Details:
easy_context/data/ (packing.py, sft.py; the job and its output-folder rules: prepare.py).

--output-dir must be a new or empty folder, or an earlier output of prepare_data.py (recognised by the
prepare_data.json it writes there), which is replaced atomically; a folder with other files is refused, and an
unmarked save_to_disk folder is replaced only with --overwrite-output-dir. A bad input (empty, not UTF-8, a text
that is not a string, a missing column) ends with one error line naming the file and row, exit status 2.
"""
from easy_context.data.prepare import main

if __name__ == "__main__":
    main()
