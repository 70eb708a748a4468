"""The prompted all-at-once simulator (OpenAI: Bills et al., 2023), a reference for values.

An untuned model reads an explanation and a text laid out one subject token a line, `token<TAB>unknown`, and
its next-token distribution right after each line's tab, over the digits "0".."9", is that token's predicted
activation: P(active) = 1 - P("0"), the expected value the mean digit. Causal attention means no line's
prediction sees what follows it, so every position is read from one forward pass (equal to reading each
prefix on its own: tests/test_values.py). OpenAI's scale is 0-10; "10" is two tokens for SmolLM2, so ours is
0-9 (Pearson r does not depend on the scale).
"""

from __future__ import annotations

import numpy as np
import torch

from latentsim.errors import BadInputError
from latentsim.simulators.base import probabilities

PREAMBLE = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at an explanation of what the neuron does, and try to predict its activations on each "
    'token.\n\nThe activation format is token<tab>activation, activations go from 0 to 9, "unknown" '
    "indicates an unknown activation. Most activations will be 0.\n\n"
)
DIGITS = tuple(str(d) for d in range(10))


def digit_ids(tokenizer) -> list[int]:
    """The token id of each digit 0-9, each one token on its own."""
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in DIGITS]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != 10:
        raise BadInputError(
            "the all-at-once simulator needs the digits 0-9 as single tokens of its tokenizer."
        )
    return [i[0] for i in ids]


def shown(token: str) -> str:
    """A subject token as one line shows it (its newlines and tabs escaped)."""
    return token.replace("\n", "\\n").replace("\t", "\\t")


def prompt_ids(tokenizer, explanation: str, tokens: list[str]) -> tuple[list[int], list[int]]:
    """(the prompt's ids, the position of each token's tab: its prediction is read there), segments tokenized
    one at a time so that every tab's position is exact."""
    head = f"{PREAMBLE}Neuron 1\nExplanation of neuron 1 behavior: {explanation.strip()}\n"
    head += "Activations:\n<start>\n"
    ids = list(tokenizer(head, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    tab = tokenizer("\t", add_special_tokens=False)["input_ids"]
    if not tab:
        raise BadInputError(
            "the all-at-once simulator needs a tokenizer that keeps tabs (token<TAB>activation)."
        )
    unknown = tokenizer("unknown\n", add_special_tokens=False)["input_ids"]
    reads = []
    for token in tokens:
        ids += tokenizer(shown(token), add_special_tokens=False)["input_ids"] + tab
        reads.append(len(ids) - 1)
        ids += unknown
    return ids + tokenizer("<end>", add_special_tokens=False)["input_ids"], reads


@torch.no_grad()
def digit_logits(
    model, tokenizer, explanation: str, texts: list[list[str]], batch_size: int = 8
) -> list[np.ndarray]:
    """Per text (its subject token strings), the digits' logits [n_tokens, 10] after each token's tab, from
    one forward pass per text (batched, right-padded: no real token attends to padding)."""
    digits = torch.tensor(digit_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    built = [prompt_ids(tokenizer, explanation, tokens) for tokens in texts]
    out = []
    for a in range(0, len(built), batch_size):
        chunk = built[a : a + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batch = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device)
        logits = model(input_ids=batch).logits.float()
        for b, (_, reads) in enumerate(chunk):
            out.append(logits[b, reads][:, digits.to(device)].cpu().numpy())
    return out


def naive_digit_logits(model, tokenizer, explanation: str, tokens: list[str]) -> np.ndarray:
    """The exactness reference: each token's digits read from a prompt cut right after its own tab."""
    ids, reads = prompt_ids(tokenizer, explanation, tokens)
    digits = digit_ids(tokenizer)
    device = next(model.parameters()).device
    with torch.no_grad():
        rows = [
            model(input_ids=torch.tensor([ids[: p + 1]], device=device)).logits[0, -1].float() for p in reads
        ]
    return torch.stack(rows)[:, digits].cpu().numpy()


def read_digits(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(active) = 1 - P("0"), the expected digit) from digit logits [..., 10]."""
    probs = probabilities(logits)
    return 1.0 - probs[..., 0], probs @ np.arange(10, dtype=np.float64)
