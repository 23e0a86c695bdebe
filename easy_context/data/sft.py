"""SFT preparation: one example (a prompt/response pair or a conversation) as ``{"tokens", "labels"}``, labels -100
except on the response (prepare_data.py ``--sft``, which implies ``--packing documents``: one example = one document).

Examples come either from two text columns (``--prompt-column`` / ``--response-column``, default ``prompt`` /
``response``: the document is ``[BOS] + tokens(prompt + response) + [EOS]``) or from a conversation column
(``--messages-column``, default ``messages``: a list of ``{"role", "content"}`` rendered with the tokenizer's chat
template, which then owns all framing: no BOS/EOS is added). Rows also carry ``labels``: a token's own id where it
belongs to a response (every assistant message of a conversation; the EOS after a prompt/response pair, so the model
learns to stop), -100 elsewhere (BOS, prompt, system and user turns, the template's generation prompts). The text is
tokenised once as a whole, and a token is a response token when its characters overlap a response's (the rule of
transformers' ``return_assistant_tokens_mask``); a conversation's response spans come from rendering its prefixes
(the conversation up to each assistant message with the generation prompt, and through it), which must render as
prefixes of the whole conversation.
"""
from __future__ import annotations

from .loading import IGNORE_INDEX


def _labels_from_spans(tokenizer, text: str, spans) -> dict:
    """``{"tokens", "labels"}`` of ``text`` tokenised as a whole (no special tokens added): a token's label is its id
    when its characters overlap one of ``spans`` (``[start, end)`` character ranges, ascending), else -100."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError(f"SFT labels need a tokenizer with character offsets (a fast tokenizer: a folder with "
                         f"tokenizer.json); {type(tokenizer).__name__} has none: convert it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...)") from None
    labels = []
    span = 0
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        inside = span < len(spans) and end > spans[span][0] and start < spans[span][1]
        labels.append(token if inside else IGNORE_INDEX)
    return {"tokens": list(enc["input_ids"]), "labels": labels}


def sft_tokens(tokenizer, prompt: str, response: str) -> dict:
    """One prompt/response example as ``{"tokens", "labels"}`` (before BOS/EOS framing): ``prompt + response``
    tokenised as a whole; the tokens overlapping the response get their id as label, the others -100."""
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"the {name} of an SFT example is {type(value).__name__}, not text: {value!r:.80}")
    return _labels_from_spans(tokenizer, prompt + response, [(len(prompt), len(prompt) + len(response))])


def check_chat_template(tokenizer) -> None:
    """Raise ValueError naming the fix when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) has "
                         "no chat template, so a messages column cannot be rendered: use a tokenizer folder that has "
                         "one (chat_template.jinja, or 'chat_template' in tokenizer_config.json: set "
                         "tokenizer.chat_template = '...' and save_pretrained), or give the examples as text columns "
                         "(--prompt-column / --response-column)")


def chat_tokens(tokenizer, messages) -> dict:
    """One conversation as ``{"tokens", "labels"}``, rendered with the tokenizer's chat template (which owns the
    framing: BOS, turn markers, end-of-turn tokens).

    Every assistant message is a response: the characters from the end of the generation prompt that precedes it
    (``messages[:i]`` rendered with ``add_generation_prompt=True``) to the end of ``messages[:i + 1]`` rendered; the
    tokens overlapping them get their id as label (the end-of-turn marker included, so the model learns to stop),
    all others -100.

    Raises:
        ValueError: the tokenizer has no chat template; a message without role/content; no assistant message; a
            template that renders a prefix of the conversation differently from the whole (e.g. one that drops
            earlier turns' reasoning), where response spans cannot be found.
    """
    check_chat_template(tokenizer)
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in messages):
        raise ValueError(f"a conversation must be a list of {{'role', 'content'}} messages, got {messages!r:.120}")

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"the chat template renders the conversation up to assistant message {i} differently "
                             "from the start of the whole conversation (it rewrites earlier turns, e.g. drops their "
                             "reasoning), so the response tokens cannot be located; give the examples as text columns "
                             "(--prompt-column / --response-column) or use a template that renders prefixes "
                             "consistently")
        spans.append((len(before), len(through)))
    if not spans:
        raise ValueError(f"a conversation has no assistant message (roles: {[m['role'] for m in messages]}): SFT "
                         "learns the assistant's turns, so it would add no loss; drop it from the data")
    return _labels_from_spans(tokenizer, text, spans)


def sft_source(columns, prompt_column, response_column, messages_column, where="the input"):
    """``("messages", column)`` or ``("prompt_response", prompt, response)`` from the columns and the flags given."""
    if messages_column is not None and (prompt_column is not None or response_column is not None):
        raise ValueError("pass either --messages-column or --prompt-column/--response-column, not both")
    if messages_column is None and prompt_column is None and response_column is None and "messages" in columns:
        messages_column = "messages"
    if messages_column is not None:
        if messages_column not in columns:
            raise ValueError(f"--sft: {where} has no {messages_column!r} column (columns: {columns}); pass "
                             "--messages-column")
        return ("messages", messages_column)
    prompt, response = prompt_column or "prompt", response_column or "response"
    missing = [c for c in (prompt, response) if c not in columns]
    if missing:
        raise ValueError(f"--sft: {where} has no {' or '.join(map(repr, missing))} column (columns: {columns}); pass "
                         "--prompt-column/--response-column, or --messages-column for conversations")
    return ("prompt_response", prompt, response)
