"""The token-list interpretation format (latentsim.explain.token_list_explanation) read back into its cues.

    the token "cat" (also "mat", "dog"), often after "the", "a", as in "...the cat" and "...a mat"

Every name is a JSON string (so it may hold quotes, commas or `, as in`); the quoted example contexts come
last, as written, joined by ` and `. References and the lexical reader read interpretations through this.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

JSON_STRING = r'"(?:[^"\\]|\\.)*"'
TOKEN_LIST_RE = re.compile(
    rf"^the token (?P<first>{JSON_STRING})"
    rf"(?: \(also (?P<also>{JSON_STRING}(?:, {JSON_STRING})*)\))?"
    rf"(?:, often after (?P<after>{JSON_STRING}(?:, {JSON_STRING})*))?"
    r', as in (?P<contexts>"\.\.\..*")$',
    re.S,
)


@dataclass(frozen=True)
class TokenList:
    """A token-list interpretation (token_list_explanation's format) read back into its cues."""

    tokens: tuple[str, ...]  # the tokens the latent fires on, strongest first
    preceding: tuple[str, ...]  # the tokens those most often follow (`often after`), most often first
    contexts: tuple[str, ...]  # the quoted example contexts, each ending at the token it fires on


def _json_strings(part: str | None) -> tuple[str, ...]:
    out = []
    for raw in re.findall(JSON_STRING, part or ""):
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            out.append(raw[1:-1])
    return tuple(out)


def parse_token_list(text: str) -> TokenList | None:
    """The cues of a token-list interpretation; None for any other text (free-text interpretations)."""
    match = TOKEN_LIST_RE.match(text.strip())
    if match is None:
        return None
    # Contexts are quoted as written (not JSON): split only where the next quote opens with "...".
    quotes = re.split(r'" and "(?=\.\.\.)', match["contexts"][1:-1])
    return TokenList(
        tokens=_json_strings(match["first"]) + _json_strings(match["also"]),
        preceding=_json_strings(match["after"]),
        contexts=tuple(q.removeprefix("...") for q in quotes),
    )
