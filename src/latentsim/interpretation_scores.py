"""Interpretation scores (delphi's definitions), judged by an LLM reading Yes/No logits.

- detection: the judge sees an un-highlighted window and the interpretation and says whether the latent fires
  anywhere in it; activating and non-activating windows are mixed.
- fuzz: the judge sees a window with some tokens marked <<like this>> and says whether the marks are the
  tokens the latent fires on; activating windows are marked correctly (tokens >= 0.3 x the window's max,
  delphi's threshold), non-activating windows on as many random tokens.

The score of a latent is the balanced accuracy of the judge's predictions (P(Yes) > 0.5), mean of the rates on
activating and non-activating windows. Per-latent records are written in delphi's layout (a JSON list of
classifier outputs per latent), so delphi's own score files load the same way; `load_scores` reads either that
folder or the {latent: score} JSON file data_gen/score.py writes next to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.explain import FILE_RE, Example, highlighted_text

SCORERS = ("detection", "fuzz")
DETECTION_PROMPT = (
    "Here is the interpretation of a feature of a language model, and a text.\n\nInterpretation: "
    "{interpretation}\n\nText: {text}\n\nIs the feature active on any token of the text? Answer Yes or No."
)
FUZZ_PROMPT = (
    "Here is the interpretation of a feature of a language model, and a text where some tokens are marked "
    "<<like this>>.\n\nInterpretation: {interpretation}\n\nText: {text}\n\nAre the marked tokens ones the "
    "feature is active on? Answer Yes or No."
)


def fuzzed_text(example: Example, n_marks: int, tokenizer, rng: np.random.Generator) -> str:
    """A non-activating window with `n_marks` random tokens marked."""
    marks = set(
        rng.choice(len(example.tokens), size=min(n_marks, len(example.tokens)), replace=False).tolist()
    )
    parts = []
    for i, tok in enumerate(example.tokens.tolist()):
        piece = tokenizer.decode([tok], skip_special_tokens=True)
        parts.append(f"<<{piece}>>" if i in marks and piece else piece)
    return "".join(parts).replace("\n", " ")


def scorer_items(
    scorer: str,
    interpretation: str,
    activating: list[Example],
    non_activating: list[Example],
    subject_tokenizer,
    rng: np.random.Generator,
) -> list[dict]:
    """The judge prompts of one latent, each with the ground truth `activating`."""
    items = []
    if scorer == "detection":
        for ex, truth in [(e, True) for e in activating] + [(e, False) for e in non_activating]:
            text = subject_tokenizer.decode(ex.tokens.tolist(), skip_special_tokens=True).replace("\n", " ")
            items.append(
                {
                    "text": text,
                    "activating": truth,
                    "prompt": DETECTION_PROMPT.format(interpretation=interpretation, text=text),
                }
            )
    elif scorer == "fuzz":
        marked = [int((e.activations >= 0.3 * e.max_activation).sum()) for e in activating]
        n_marks = math.ceil(float(np.mean(marked))) if marked else 1
        for ex in activating:
            text = highlighted_text(ex, subject_tokenizer)
            items.append(
                {
                    "text": text,
                    "activating": True,
                    "prompt": FUZZ_PROMPT.format(interpretation=interpretation, text=text),
                }
            )
        for ex in non_activating:
            text = fuzzed_text(ex, n_marks, subject_tokenizer, rng)
            items.append(
                {
                    "text": text,
                    "activating": False,
                    "prompt": FUZZ_PROMPT.format(interpretation=interpretation, text=text),
                }
            )
    else:
        raise ConfigError(f"config key `scorer`: {scorer!r} is not one of {SCORERS}.")
    return items


def balanced_accuracy(records: list[dict]) -> float:
    """Mean of the hit rates on activating and non-activating windows (0.5 = chance)."""
    rates = []
    for truth in (True, False):
        mine = [r for r in records if bool(r["activating"]) == truth]
        if mine:
            rates.append(sum(bool(r["prediction"]) == truth for r in mine) / len(mine))
    return float(np.mean(rates)) if rates else float("nan")


def load_score_folder(folder: str | Path, hookpoint: str) -> dict[int, float]:
    """{latent: balanced accuracy} from per-latent score files (ours or delphi's `scores/<scorer>/`)."""
    folder = Path(folder)
    out = {}
    for file in sorted(folder.glob("*.txt")):
        match = FILE_RE.match(file.name)
        if not match:
            raise BadInputError(f"{file}: not named <hookpoint>_latent<id>.txt (delphi's layout).")
        if match["module"].replace("--", ".").removeprefix("model.") != hookpoint.removeprefix("model."):
            raise BadInputError(
                f"{file} scores hookpoint {match['module']!r}, but the SAE reads {hookpoint!r}."
            )
        records = json.loads(file.read_text())
        if not isinstance(records, list) or (records and not {"activating", "prediction"} <= set(records[0])):
            raise BadInputError(
                f"{file}: expected a JSON list of classifier outputs with `activating` and `prediction`."
            )
        out[int(match["latent"])] = balanced_accuracy(records)
    if not out:
        raise MissingInputError(f"{folder} holds no per-latent score files; run data_gen/score.py.")
    return out


def load_scores(path: str | Path, hookpoint: str, width: int, key: str = "score_path") -> dict[int, float]:
    """{latent: score} from a JSON dict (data_gen/score.py writes one per scorer) or a per-latent score folder
    (load_score_folder), checked against the SAE's `width`. `key` is the config key errors name."""
    if Path(path).is_dir():
        scores = load_score_folder(path, hookpoint)
    else:
        wrong = (
            f"config key `{key}`: {path} must be a JSON file {{latent: score}} or a folder of per-latent "
            "score files (data_gen/score.py writes both)."
        )
        if not Path(path).is_file():
            raise MissingInputError(wrong)
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise BadInputError(wrong) from err
        if not isinstance(data, dict):
            raise BadInputError(wrong)
        scores = {int(k): float(v) for k, v in data.items()}
    if any(not 0 <= k < width for k in scores):
        raise BadInputError(
            f"config key `{key}`: {path} scores latents outside the SAE's {width}; wrong SAE?"
        )
    return scores
