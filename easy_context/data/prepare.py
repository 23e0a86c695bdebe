"""The prepare_data job (``prepare_data.py`` / ``python -m easy_context.data``): read a local corpus, tokenise it
(plain text, or SFT examples: :mod:`.sft`), pack it (:mod:`.packing`) and ``save_to_disk`` it in the format
:mod:`.loading` reads; the rules for the output folder it may write; its command line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys

from ..utils import check_source
from .loading import load_any
from .packing import PACKING_MODES, pack_documents, pack_documents_with_positions
from .sft import chat_tokens, check_chat_template, sft_source, sft_tokens

# ----------------------------------------------------------------------------- prepare_data's output folder
# prepare_data.py writes only into a new or empty folder or over its own earlier output, which it recognises by this
# file (what wrote it, from what, and how); it never deletes a folder that holds anything else.
MARKER_FILE = "prepare_data.json"
WRITTEN_BY = "easy_context prepare_data.py"
_TMP_MARKER = ".prepare_data_tmp"  # in <output-dir>.tmp: the folder is prepare_data's, a killed run's may be removed
# what save_to_disk writes for one Dataset (datasets' own cache files included) besides the marker
_DATASET_FILE = re.compile(r"state\.json|dataset_info\.json|data-\d{5}-of-\d{5}\.arrow|cache-[\w.-]+\.arrow")


def _is_marker(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def output_dir_problem(output_dir: str, *, overwrite: bool = False, sources=()) -> str | None:
    """Why prepare_data.py may not write ``output_dir`` (None: it may), naming the fix.

    It may write a folder that does not exist, an empty one, or one that holds only its own earlier output (its
    :data:`MARKER_FILE` and the ``save_to_disk`` files); with ``overwrite`` also a ``save_to_disk`` folder of one
    dataset without the marker (an older prepare_data.py's). Never the working folder or one above it, a folder
    that holds any other file (even with ``overwrite``), one of ``sources`` (``[(flag, path)]``, e.g. the input)
    or a folder around or inside one, nor when ``<output_dir>.tmp`` exists and is not prepare_data's.
    """
    out = os.path.abspath(output_dir)
    if os.path.commonpath([out, os.getcwd()]) == out:
        return (f"--output-dir {output_dir} is the working folder or one above it: prepare_data.py replaces its "
                "output folder as a whole; pass a new folder, e.g. --output-dir data/packed")
    for flag, path in sources:
        src = os.path.abspath(path)
        if os.path.exists(src) and os.path.commonpath([out, src]) in (out, src):
            return (f"--output-dir {output_dir} and {flag} {path} are the same folder or one holds the other: "
                    "pass another --output-dir")
    tmp = out + ".tmp"
    if os.path.lexists(tmp) and not os.path.isfile(os.path.join(tmp, _TMP_MARKER)):
        return (f"{tmp} exists and was not made by prepare_data.py (which writes there first): move it away, or "
                "pass another --output-dir")
    if not os.path.lexists(out):
        return None
    if os.path.islink(out) or not os.path.isdir(out):
        return f"--output-dir {output_dir} is a file or a link, not a folder: pass another --output-dir"
    names = sorted(os.listdir(out))
    foreign = [n for n in names if not ((n == MARKER_FILE or _DATASET_FILE.fullmatch(n))
                                        and os.path.isfile(os.path.join(out, n)))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"--output-dir {output_dir} holds files prepare_data.py did not write ({shown}); it replaces only "
                "its own earlier output (even with --overwrite-output-dir): pass a new or empty folder as --output-dir")
    if not names or _is_marker(os.path.join(out, MARKER_FILE)):
        return None
    if overwrite and {"state.json", "dataset_info.json"} <= set(names):
        return None
    return (f"--output-dir {output_dir} holds a dataset without prepare_data.py's {MARKER_FILE} (written by something "
            "else, or an older prepare_data.py): pass --overwrite-output-dir to replace it, or another --output-dir")


def _claim_tmp(out: str) -> str:
    """``<out>.tmp``, new and marked as prepare_data's. A killed run's is removed first; if it was killed between
    moving the earlier output aside and moving the new one in, the earlier output goes back in place."""
    tmp = out + ".tmp"
    if os.path.isfile(os.path.join(tmp, _TMP_MARKER)):
        _release_tmp(tmp, out)
    os.makedirs(tmp)
    open(os.path.join(tmp, _TMP_MARKER), "w").close()
    return tmp


def _release_tmp(tmp: str, out: str) -> None:
    old = os.path.join(tmp, "old")
    if os.path.isdir(old) and not os.path.lexists(out):
        os.rename(old, out)
    shutil.rmtree(tmp, ignore_errors=True)


def _replace_output(tmp: str, out: str) -> None:
    """Move ``tmp/data`` to ``out``: the earlier output (if any) is renamed aside into ``tmp`` first and removed only
    after the new one is in place, so ``out`` holds the old output or the new one, whole, but for the instant between
    the two renames (a run killed there gets the old one back on the next run: :func:`_claim_tmp`)."""
    old = os.path.join(tmp, "old")
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(os.path.join(tmp, "data"), out)


# ----------------------------------------------------------------------------- prepare_data's input
def _not_utf8(paths) -> str | None:
    """The first line of ``paths`` (text files) that is not UTF-8, as an error naming the file, line and fix."""
    for path in paths:
        if os.path.splitext(path)[1].lower() not in (".txt", ".json", ".jsonl", ".csv", ""):
            continue
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"{path} line {n} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}): "
                            f"prepare_data.py reads UTF-8; convert the file, e.g. `iconv -f latin1 -t utf-8 {path}`")
    return None


@contextlib.contextmanager
def _reading(input_path: str):
    """Reading ``input_path`` with datasets: a failure caused by text that is not UTF-8 becomes a ValueError naming
    the file and line (datasets says neither); our own errors and any other failure pass unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (ValueError, FileNotFoundError)) and not isinstance(e, UnicodeDecodeError):
            raise
        problem = _not_utf8(_input_files(input_path))
        if problem:
            raise ValueError(problem) from None
        raise


def _input_files(input_path: str) -> list[str]:
    if os.path.isfile(input_path):
        return [input_path]
    return sorted(os.path.join(root, n) for root, _, names in os.walk(input_path) for n in names)


def prepare_corpus(input_path: str, tokenizer_path: str, seq_length: int, output_dir: str, *,
                   text_column: str = "text", add_bos: bool = True, add_eos: bool = True, num_proc: int = 1,
                   sample_by: str = "document", packing: str | None = None, sft: bool = False,
                   prompt_column: str | None = None, response_column: str | None = None,
                   messages_column: str | None = None, overwrite_output_dir: bool = False):
    """Tokenise a local corpus with a tokenizer, pack it into ``seq_length`` rows, ``save_to_disk`` it.

    Args:
        input_path: a .txt/.jsonl/.json/.parquet/.arrow/.csv file, a folder of them, or a ``save_to_disk`` folder.
        tokenizer_path: anything ``AutoTokenizer.from_pretrained`` takes (a local folder with ``tokenizer.json``).
        text_column: the column holding the text (``.txt`` files give ``text``); not used with ``sft``.
        add_bos, add_eos: frame every document with the tokenizer's BOS / EOS token (:mod:`.packing`); not
            used for conversations (the chat template frames them).
        sample_by: for .txt input: ``document`` (a file is one document), ``paragraph`` or ``line``.
        packing: ``"stream"`` (rows of ``input_ids``) or ``"documents"`` (rows also carry ``position_ids``
            restarting at each document); None = ``"documents"`` with ``sft``, else ``"stream"``.
        sft: examples with response-only labels (rows also carry ``labels``); implies ``"documents"``.
        prompt_column, response_column, messages_column: where SFT examples are: a messages column (default
            ``messages`` when present) or prompt/response text columns (default ``prompt`` / ``response``).
        output_dir: a new or empty folder, or one holding this function's earlier output (recognised by its
            :data:`MARKER_FILE`), which is replaced atomically; ``overwrite_output_dir`` also replaces a
            ``save_to_disk`` folder without the marker. Anything else is refused (:func:`output_dir_problem`).
    Returns:
        The packed ``Dataset`` (also written to ``output_dir``).
    Raises:
        ValueError: an output folder it may not write; an empty or non-UTF-8 input file, a text that is not a
            string (naming the file and row); missing columns; BOS/EOS asked for but the tokenizer has none; ``sft``
            with ``"stream"``; a conversation the tokenizer cannot render (no chat template, ...); nothing left to
            pack. FileNotFoundError: no such input or tokenizer.
    """
    from datasets import Dataset, load_dataset, load_from_disk
    from transformers import AutoTokenizer

    if packing is None:
        packing = "documents" if sft else "stream"
    if packing not in PACKING_MODES:
        raise ValueError(f"--packing {packing!r}: choose one of {', '.join(PACKING_MODES)}")
    if sft and packing != "documents":
        raise ValueError("--sft packs each example as its own document: drop --packing stream (--sft implies "
                         "--packing documents)")
    if not sft and any(c is not None for c in (prompt_column, response_column, messages_column)):
        raise ValueError("--prompt-column / --response-column / --messages-column describe SFT examples: add --sft")
    if seq_length < 2:
        raise ValueError(f"--seq-length {seq_length}: a training sample needs at least 2 tokens")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file or folder")
    if os.path.isfile(input_path) and os.path.getsize(input_path) == 0:
        raise ValueError(f"--input {input_path} is empty: nothing to tokenise")
    if os.path.isdir(input_path) and not _input_files(input_path):
        raise ValueError(f"--input {input_path} is an empty folder: nothing to tokenise")
    check_source(tokenizer_path, "--tokenizer")
    problem = output_dir_problem(output_dir, overwrite=overwrite_output_dir,
                                 sources=(("--input", input_path), ("--tokenizer", tokenizer_path)))
    if problem:  # before any work
        raise ValueError(problem)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    with _reading(input_path):
        if os.path.splitext(input_path)[1].lower() == ".txt" or (
                os.path.isdir(input_path) and all(f.endswith(".txt") for f in os.listdir(input_path))):
            files = input_path if os.path.isfile(input_path) else sorted(
                os.path.join(input_path, f) for f in os.listdir(input_path))
            raw = load_dataset("text", data_files=files, split="train", sample_by=sample_by)
        else:
            raw = load_any(input_path)
    if not len(raw):
        raise ValueError(f"--input {input_path} has no rows: nothing to tokenise")
    source = sft_source(raw.column_names, prompt_column, response_column, messages_column,
                         input_path) if sft else None
    if source is not None and source[0] == "messages":
        add_bos = add_eos = False  # the chat template frames each conversation
        check_chat_template(tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    for flag, wanted, token in (("--no-bos", add_bos, bos), ("--no-eos", add_eos, eos)):
        if wanted and token is None:
            raise ValueError(f"tokenizer {tokenizer_path} has no {flag[5:].upper()} token; pass {flag}")
    if source is None and text_column not in raw.column_names:
        raise ValueError(f"{input_path} has no {text_column!r} column (columns: {raw.column_names}); pass "
                         "--text-column")

    def row_error(index, message):  # rows count from 1, as the lines of a .jsonl file do
        return ValueError(f"{input_path} row {index + 1}: {message}")

    def tokenize(batch, indices):
        if source is None:
            texts = batch[text_column]
            for i, text in zip(indices, texts):
                if not isinstance(text, str):
                    what = "no value (null)" if text is None else f"{type(text).__name__} {text!r:.40}"
                    raise row_error(i, f"the {text_column!r} column holds {what}, not text: fix the row, or pass "
                                       "--text-column naming the column of the text")
            return {"tokens": tokenizer(texts, add_special_tokens=False)["input_ids"]}
        docs = []
        for n, i in enumerate(indices):
            try:
                if source[0] == "messages":
                    docs.append(chat_tokens(tokenizer, batch[source[1]][n]))
                else:
                    docs.append(sft_tokens(tokenizer, batch[source[1]][n], batch[source[2]][n]))
            except ValueError as e:
                raise row_error(i, str(e)) from None
        return {"tokens": [d["tokens"] for d in docs], "labels": [d["labels"] for d in docs]}

    with _reading(input_path):  # a .jsonl's strings are decoded here
        tokens = raw.map(tokenize, batched=True, with_indices=True, remove_columns=raw.column_names,
                         num_proc=num_proc or None)

    frame = (bos is not None) + (eos is not None)
    total = 0
    for batch in tokens.iter(batch_size=1000):  # stops as soon as one chunk is certain
        total += sum(len(t) + frame for t in batch["tokens"])
        if total >= seq_length:
            break
    if total < seq_length:
        raise ValueError(f"the corpus has {total} tokens, fewer than seq_length={seq_length}: nothing to pack")

    def chunks():
        if packing == "stream":
            yield from pack_documents((row["tokens"] for row in tokens), seq_length, bos_id=bos, eos_id=eos)
        else:
            yield from pack_documents_with_positions(iter(tokens), seq_length, bos_id=bos, eos_id=eos)

    # Written under <output_dir>.tmp (from_generator's arrow cache inside it, not in ~/.cache) and renamed when
    # complete: a killed run leaves only the .tmp folder (marked as prepare_data's), which the next run removes.
    out = os.path.abspath(output_dir)
    tmp = _claim_tmp(out)
    try:
        packed = Dataset.from_generator(chunks, cache_dir=os.path.join(tmp, "cache"))
        packed.save_to_disk(os.path.join(tmp, "data"))
        marker = {"written_by": WRITTEN_BY, "input": os.path.abspath(input_path), "tokenizer": tokenizer_path,
                  "seq_length": seq_length, "packing": packing, "sft": sft, "bos": bos is not None,
                  "eos": eos is not None, "rows": len(packed), "columns": packed.column_names}
        with open(os.path.join(tmp, "data", MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
        problem = output_dir_problem(output_dir, overwrite=overwrite_output_dir)  # nothing new appeared meanwhile
        if problem:
            raise ValueError(problem)
        _replace_output(tmp, out)
    finally:
        _release_tmp(tmp, out)
    return load_from_disk(out)


def build_parser() -> argparse.ArgumentParser:
    """prepare_data.py's command line."""
    from ..utils import HelpFormatter

    p = argparse.ArgumentParser(prog="prepare_data.py", formatter_class=HelpFormatter,
                                description="Tokenise and pack a local corpus (text, or SFT examples with --sft) into "
                                "fixed-length input_ids samples (save_to_disk) for train.py --dataset.")
    p.add_argument("--input", required=True, help=".txt/.jsonl/.json/.parquet/.arrow/.csv file or folder (UTF-8)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (AutoTokenizer)")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per packed sample")
    p.add_argument("--output-dir", required=True,
                   help="a new or empty folder, or one holding an earlier output of prepare_data.py (replaced "
                        f"atomically; recognised by its {MARKER_FILE}); folders with other files are refused")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help=f"also replace a save_to_disk dataset folder without {MARKER_FILE} (never a folder with "
                        "other files)")
    p.add_argument("--text-column", default="text", help="the column of the text (not used with --sft)")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not start documents with BOS")
    p.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not end documents with EOS")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                   help=".txt input: what one document is")
    p.add_argument("--packing", choices=PACKING_MODES, default=None,
                   help="stream (default without --sft): documents concatenated and cut, input_ids only; documents "
                        "(default with --sft): rows also carry position_ids restarting at each document, so each "
                        "document attends only to itself (train.py --packing auto)")
    p.add_argument("--sft", action="store_true",
                   help="supervised fine-tuning examples: labels -100 except on responses; implies --packing documents")
    p.add_argument("--prompt-column", default=None, help="--sft: prompt text column (default: prompt)")
    p.add_argument("--response-column", default=None, help="--sft: response text column (default: response)")
    p.add_argument("--messages-column", default=None,
                   help="--sft: conversation column rendered with the tokenizer's chat template (default: messages, "
                        "when the input has it)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes")
    return p


def main(argv=None):
    """``prepare_data.py``: a bad input ends with one line on standard error and exit status 2 (no traceback)."""
    a = build_parser().parse_args(argv)
    try:
        packed = prepare_corpus(a.input, a.tokenizer, a.seq_length, a.output_dir, text_column=a.text_column,
                                add_bos=a.add_bos, add_eos=a.add_eos, num_proc=a.num_proc, sample_by=a.sample_by,
                                packing=a.packing, sft=a.sft, prompt_column=a.prompt_column,
                                response_column=a.response_column, messages_column=a.messages_column,
                                overwrite_output_dir=a.overwrite_output_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {len(packed)} samples x {a.seq_length} tokens ({', '.join(packed.column_names)}) to {a.output_dir}")


if __name__ == "__main__":
    main()
