"""Versioned simulator prompt formats, shared by data_gen (rendering), train (via the dataset) and eval.

A format is a name whose rendering never changes once released (golden tests in tests/golden/ pin every byte);
a new behaviour gets a new name. Rows are TRL conversational prompt-completion: `prompt` = [user message],
`completion` = [assistant message with the answer]. The question and the context come first and the
interpretation last, so at eval time one context prefix is shared by every latent and only the interpretation
(+ the chat template's closing tokens) differs per judgment (latentsim.simulators.hf.HFScorer).

The judged token is the last token of the context, marked `<<like this>>` in the text, so it stays
unambiguous whatever tokenizer the simulator uses.

Dense formats (`sim_dense_v1`, `sim_dense_value_v1`) judge every token of a text in one forward pass: plain
text, no chat template, the interpretation first (`dense_header`; its KV is shared by every text judged for
that latent), then the text unmarked; the verdict for a token is read at the last simulator token that ends
exactly where it ends (no simulator position ever reads a character of the next token), as the answer tokens'
logits there. A dense simulator also scores the per-judgment eval sets of its `judges` format: a judgment is
its context read up to the judged token (`latentsim.simulators.hf.DenseScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from latentsim.errors import BadInputError, ConfigError

MARK_OPEN, MARK_CLOSE = "<<", ">>"
# The sections of a rendered user message, in order: question, TEXT_MARK + context, INTERPRETATION_MARK +
# interpretation, optionally SCORE_MARK + score. Released formats pin these bytes (tests/golden/).
TEXT_MARK = "\n\nText: "
INTERPRETATION_MARK = "\n\nInterpretation: "
SCORE_MARK = "\nInterpretation score: "
DENSE_TEXT_MARK = "\nText:"  # dense formats: `<question> <interpretation>` + this + the text


@dataclass(frozen=True)
class PromptFormat:
    name: str
    question: str  # the instruction that opens the user message
    answers: tuple[str, ...]  # every possible completion; each must be one token for the simulator
    label: str  # what the answer encodes: `active` (Yes/No), `bin` (a 0-9 activation bin) or `active_bin`
    # (dense value formats: 0 = inactive, else 1 + the activation's bin among K, answered " No" or a digit)
    dense: bool = False  # a verdict at every text token (no chat template), see the module docstring
    judges: str | None = None  # dense: the per-judgment format whose eval sets it scores

    @property
    def judgment_format(self) -> str:
        """The per-judgment format whose eval sets a simulator trained on this format scores: a dense format's
        `judges`, else itself."""
        return self.judges if self.dense else self.name

    @property
    def binary(self) -> bool:
        """Yes/No verdicts (an `active` label), as opposed to activation bins."""
        return self.label == "active"

    @property
    def reads_active(self) -> bool:
        """P(active) can be read from the answers: Yes/No, or a dense value format's 1 - P(" No")."""
        return self.label in ("active", "active_bin")

    @property
    def value_bins(self) -> int:
        """Dense value formats: the number of activation bins K (answers: " No" + K bins); else 0."""
        return len(self.answers) - 1 if self.label == "active_bin" else 0


SIM_V1 = PromptFormat(
    name="sim_v1",
    question=(
        "Below is a text and the interpretation of a sparse-autoencoder latent. Is the latent active on the "
        f"last token of the text, the one marked {MARK_OPEN}like this{MARK_CLOSE}? Answer Yes or No."
    ),
    answers=("No", "Yes"),
    label="active",
)
SIM_VALUE_V1 = PromptFormat(
    name="sim_value_v1",
    question=(
        "Below is a text and the interpretation of a sparse-autoencoder latent that is active on the last "
        f"token of the text, the one marked {MARK_OPEN}like this{MARK_CLOSE}. How strongly is it active, "
        "from 0 (weakest) to 9 (strongest)? Answer with one digit."
    ),
    answers=tuple(str(d) for d in range(10)),
    label="bin",
)
# Why this layout: the interpretation comes first so its KV is computed once per latent and reused across
# texts; the text follows unmarked (every token is judged, none is special); no chat template, whose closing
# tokens would sit after the text and make the last token's position unlike the others'. The header is short
# and the answers are the space-led words a text continues with: with the 40-token instruction of sim_v1 and
# bare "No"/"Yes", the same 60-step CPU run reached per-context AUC 0.75 instead of 0.96 on 15 validation
# contexts (README, study).
SIM_DENSE_V1 = PromptFormat(
    name="sim_dense_v1",
    question="Latent:",
    answers=(" No", " Yes"),
    label="active",
    dense=True,
    judges="sim_v1",
)
# How strongly, at every token (issue 31): the header and reading of sim_dense_v1, but K + 1 answers, " No"
# (inactive) or the digit of the activation's decile among the latent's non-zero training activations, 0
# (weakest) to 9 (strongest) as in sim_value_v1. K is 10, the deciles the cache's statistics keep (K = 2..9:
# sim_dense_value_k{K}_v1 below); bare digits because they are single tokens in every tokenizer we use
# (SmolLM2 splits " 1" into " " + "1" and "10" in two), which is also why K stops at 10. P(active) =
# 1 - P(" No"); the expected activation maps each bin to its value (latentsim.values).
SIM_DENSE_VALUE_V1 = PromptFormat(
    name="sim_dense_value_v1",
    question="Latent:",
    answers=(" No",) + tuple(str(d) for d in range(10)),
    label="active_bin",
    dense=True,
    judges="sim_v1",
)
# Fewer bins, K = 2..9 (issue 31: K is chosen by the `prompt_format` key; sim_dense_value_v1 is K = 10): the
# same header and reading, answers " No" + the digits 0..K-1, bin k holding the latent's training activations
# between its k/K and (k+1)/K quantiles (latentsim.latent_stats.bin_edges).
SIM_DENSE_VALUE_K_V1 = {
    k: PromptFormat(
        name=f"sim_dense_value_k{k}_v1",
        question="Latent:",
        answers=(" No",) + tuple(str(d) for d in range(k)),
        label="active_bin",
        dense=True,
        judges="sim_v1",
    )
    for k in range(2, 10)
}
PROMPT_FORMATS = {
    f.name: f
    for f in (SIM_V1, SIM_VALUE_V1, SIM_DENSE_V1, SIM_DENSE_VALUE_V1, *SIM_DENSE_VALUE_K_V1.values())
}


def get_format(name: str) -> PromptFormat:
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt format {name!r}; known formats: {sorted(PROMPT_FORMATS)}.")
    return PROMPT_FORMATS[name]


def marked_context(prefix: str, judged: str) -> str:
    """The context as shown to the simulator: decoded text with the judged (last) token marked."""
    return f"{prefix}{MARK_OPEN}{judged}{MARK_CLOSE}"


def render_prompt(fmt: str, context: str, interpretation: str, score: float | None = None) -> list[dict]:
    """The prompt messages for one (context, latent) judgment. `context` comes from `marked_context`."""
    f = get_format(fmt)
    if f.dense:
        raise ConfigError(f"format {fmt} is dense: it has no per-judgment prompt (see dense_header).")
    text = f"{f.question}{TEXT_MARK}{context}{INTERPRETATION_MARK}{interpretation.strip()}"
    if score is not None:
        text += f"{SCORE_MARK}{score:.2f}"
    return [{"role": "user", "content": text}]


def dense_header(fmt: str, interpretation: str) -> str:
    """The text before the judged text in a dense format: `Latent: <interpretation>` and `Text:` on a new
    line."""
    f = get_format(fmt)
    if not f.dense:
        raise ConfigError(f"format {fmt} is not dense.")
    return f"{f.question} {interpretation.strip()}{DENSE_TEXT_MARK}"


def dense_header_ids(tokenizer, fmt: str, interpretation: str) -> list[int]:
    """Simulator token ids of a dense header (with the tokenizer's leading special tokens): the part of every
    dense example that depends only on the latent, so its KV can be computed once and reused across texts."""
    header = tokenizer(dense_header(fmt, interpretation), add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and header and header[-1] == tokenizer.eos_token_id:
        header = header[:-1]  # tokenizers that close every sequence: the text continues it
    return list(header)


def dense_text_ids(tokenizer, text: str, token_ends: list[int]) -> tuple[list[int], list[int]]:
    """Simulator token ids of a dense text (tokenized on its own, after the header) and, per judged token (its
    character end in `text`), the text position its verdict is read at: the simulator token that ends exactly
    there, or -1 when none does (that token would be read mid-way or together with the next one's characters:
    ambiguous, not guessed). Needs a fast tokenizer (character offsets)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = {}
    for j, (_, end) in enumerate(encoded["offset_mapping"]):
        ends[end] = j  # the last simulator token ending at `end`
    return list(encoded["input_ids"]), [ends.get(e, -1) for e in token_ends]


def dense_token_ids(
    tokenizer, fmt: str, interpretation: str, text: str, token_ends: list[int]
) -> tuple[list[int], list[int]]:
    """Simulator token ids of a dense example (header, then the text) and, per judged token, the position of
    the whole sequence its verdict is read at (-1 when unaligned; see dense_text_ids)."""
    header = dense_header_ids(tokenizer, fmt, interpretation)
    ids, positions = dense_text_ids(tokenizer, text, token_ends)
    return header + ids, [len(header) + p if p >= 0 else -1 for p in positions]


def render_completion(fmt: str, label: int) -> list[dict]:
    """The assistant message answering with `label` (0/1 for binary formats, 0-9 for value formats)."""
    f = get_format(fmt)
    if not 0 <= label < len(f.answers):
        raise ValueError(f"label {label} has no answer in format {fmt} (answers {f.answers}).")
    return [{"role": "assistant", "content": f.answers[label]}]


def parse_answer(fmt: str, text: str) -> int | None:
    """The label a generated answer gives, or None when it is not one of the format's answers."""
    f = get_format(fmt)
    text = text.strip()
    return f.answers.index(text) if text in f.answers else None


def answer_token_ids(fmt: str, tokenizer) -> list[int]:
    """The token id of every answer, checked to be exactly one token where it stands after the chat prompt.

    TRL tokenizes prompt and prompt+completion separately; the answer must be one token, and the prompt's
    tokens must be a prefix of prompt+completion, or the label would be split or shifted.
    """
    f = get_format(fmt)
    if f.dense:  # read at text positions, not after a chat prompt: each answer must be one token on its own
        ids = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in f.answers]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise BadInputError(
                f"format {fmt}: the answers {f.answers} are not distinct single tokens for this "
                "tokenizer; use another format."
            )
        return [i[0] for i in ids]
    messages = render_prompt(fmt, marked_context("a", "b"), "c")
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    ids = []
    for answer in f.answers:
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=True
        )
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        if full[: len(prompt_ids)] != prompt_ids:
            raise BadInputError(
                f"format {fmt}: the tokenized prompt is not a prefix of prompt + answer {answer!r} "
                "for this tokenizer's chat template; the label would be misaligned."
            )
        rest = full[len(prompt_ids) :]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(answer_ids) != 1 or rest[:1] != answer_ids:
            raise BadInputError(
                f"format {fmt}: answer {answer!r} is not one token for this tokenizer "
                f"({tokenizer.convert_ids_to_tokens(rest[:3])}); use another format."
            )
        ids.append(answer_ids[0])
    if len(set(ids)) != len(ids):
        raise BadInputError(f"format {fmt}: two answers share a token for this tokenizer.")
    return ids


def unmark_context(context: str) -> tuple[str, str]:
    """The inverse of `marked_context`: (the unmarked prefix, the judged token). The last mark is the judged
    token's (a text may itself contain `<<`)."""
    prefix, sep, rest = context.rpartition(MARK_OPEN)
    if not sep or not rest.endswith(MARK_CLOSE):
        raise BadInputError(
            f"not a marked context (no trailing `{MARK_OPEN}token{MARK_CLOSE}`): {context[-40:]!r}"
        )
    return prefix, rest[: -len(MARK_CLOSE)]


def drop_context_tokens(context: str, n_tokens: int, tokenizer) -> str:
    """The same marked context with the first `n_tokens` (simulator tokens) of its prefix removed; the judged
    token stays."""
    prefix, judged = unmark_context(context)
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return marked_context(tokenizer.decode(ids[n_tokens:]) if n_tokens < len(ids) else "", judged)


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A chat prompt's token ids with the generation prompt: exactly what train/sft.py's eval and every scorer
    read."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_template_sha256(tokenizer) -> str:
    """The chat template's hash: training records it, scoring refuses another."""
    import hashlib

    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
