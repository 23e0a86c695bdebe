"""Training data, one module per job:

* :mod:`.loading`: what training reads at run time: the dataset format ``train.py`` consumes (``input_ids``, and
  optionally ``labels`` and ``position_ids``), loading it from a ``save_to_disk`` folder, a file or the hub (or a
  synthetic set), the collator and the next-token targets.
* :mod:`.packing`: offline packing of tokenised documents into fixed-length rows (``--packing stream|documents``).
* :mod:`.sft`: SFT examples (prompt/response columns, or conversations through a chat template) as tokens with
  response-only labels.
* :mod:`.prepare`: the prepare_data job: tokenise, pack and write a corpus, the rules for its output folder, and
  its command line (``prepare_data.py`` / ``python -m easy_context.data``).

The names below are the ones ``easy_context.data`` has always had; import them from here or from their module.
"""
from .loading import (
                      IGNORE_INDEX,
                      SYNTHETIC,
                      TRAIN_PACKING,
                      FixedLengthCollator,
                      check_dataset_source,
                      check_position_ids,
                      load_any,
                      load_train_dataset,
                      looks_local,
                      shift_targets,
                      synthetic_dataset,
)
from .packing import PACKING_MODES, pack_documents, pack_documents_with_positions
from .prepare import MARKER_FILE, WRITTEN_BY, build_parser, main, output_dir_problem, prepare_corpus
from .sft import chat_tokens, check_chat_template, sft_source, sft_tokens

__all__ = [
    "IGNORE_INDEX", "SYNTHETIC", "TRAIN_PACKING", "FixedLengthCollator", "check_dataset_source", "check_position_ids",
    "load_any", "load_train_dataset", "looks_local", "shift_targets", "synthetic_dataset",
    "PACKING_MODES", "pack_documents", "pack_documents_with_positions",
    "chat_tokens", "check_chat_template", "sft_source", "sft_tokens",
    "MARKER_FILE", "WRITTEN_BY", "build_parser", "main", "output_dir_problem", "prepare_corpus",
]
