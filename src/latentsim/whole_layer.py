"""The whole layer rewritten by a simulator, over held-out texts (eval/whole_layer.py).

For each of `texts` held-out texts (a cache row's positions 1..`tokens`; BOS is never encoded) the simulator
judges every explained latent at every position (`DenseScorer.text_logits`; a sim_v1 simulator one prompt
per (position, latent)), and the layer output at every position is rebuilt from its verdicts alone: no latent
keeps an SAE value because the simulator was not asked about it. Sources (each a [n, d] layer output, patched
in at all positions at once):

- `sae`: the SAE reconstruction (the ceiling); `sae:explained_only`: only the explained latents' true values
  (the ceiling of any simulator when unexplained latents are zeroed); `no_latents`: every latent 0, i.e. b_dec
  (the floor of a layer rebuilt from latents); `mean_update`: at every position the SAE's mean output over
  every position of the calibration texts, i.e. the decoder applied to the mean latent vector there (the
  decoder is affine, so this is also the mean reconstruction): a stronger floor, what a layer that reads
  nothing of the text but knows its average gets (absent without calibration texts);
- `sim@<threshold>:<value>:<unexplained>`: the latents with P(yes) >= threshold at that position, valued
  `oracle` (the true value where truly active, else the latent's median activation), `median`, or
  `predicted` (a value simulator's expected activation given active: Σ_k P(bin k) value_k / P(active), each
  bin's value from the training rows, latentsim.values; nothing from the SAE but its decoder); unexplained
  latents `zeroed` or `kept` at their SAE values (labelled: kept ones are not the simulator's work);
- `sim@...:held_out_only:trained_<kept|zeroed>`: only the latents the simulator did not train on are its
  decisions; those it trained on keep their SAE values or are zeroed (`sae:held_out_only`: the held-out
  explained latents' true values alone). Made only when it trained on some of the explained latents;
- `ref:<name>@<threshold>:<value>:<unexplained>`: a reference simulator (`references`: prior, string_match,
  the lexical reader...) deciding every explained latent from its own P(yes) (`text_p_yes`) at its own
  thresholds (its `l0_matched` fitted on the calibration texts like the simulator's);
- `firing_rate_random:<value>:<unexplained>`: each explained latent flagged at random with its firing rate
  (reads nothing: "everything flagged at chance"), the per-position mean over `chance_draws` independent
  draws; results.json's `chance` holds each draw's recovery and their spread (one draw alone is noisy).

Statistics: mean KL and CE over every position of every text, with 95% CIs that resample whole texts
(`ci95_texts`: texts are the independent units; with one text there is none) and, beside them, blocks of
BLOCK consecutive positions of one text (`ci95`). Recovery (KL_floor - KL) / (KL_floor - KL_sae) from
`no_latents` (`recovery`) and from `mean_update` (`recovery_from_mean_update`), each with a CI over texts
(every source's recovery from the same resamples). Judgment metrics (pooled AUC, per-latent AUC over every
position, recall and precision at each threshold) for the simulator and each reference, over all positions
(`judgments`) and without positions 1-2 (`judgments_from_position_3`: many latents fire right after BOS
whatever the token).

Verdicts at tokens the simulator's tokenizer cannot align are "not flagged". `l0_matched` is the threshold at
which a decider flags as many (position, latent) pairs on the calibration texts as the SAE has explained
active ones there.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from latentsim.dataset import dense_window
from latentsim.errors import BadInputError, ConfigError
from latentsim.io import atomic_write_bytes, atomic_write_json
from latentsim.metrics import N_BOOT, bootstrap_ci, bootstrap_counts, percentile_interval, roc_auc
from latentsim.patching import all_positions_logits, clean_pass, kl_and_ce
from latentsim.tables import whole_layer_rows

if TYPE_CHECKING:
    from latentsim.eval_set import EvalSet

PATCH_CHUNK = 4  # full patched passes at a time: [4, T, V] logits
BLOCK = 8  # bootstrap clusters: blocks of 8 consecutive positions of one text (neighbours are correlated)
SIMULATOR = "sim"  # the simulator's decision sources: sim@<threshold>
REFERENCE = "ref:"  # a reference's: ref:<name>@<threshold>
CHANCE = "firing_rate_random"  # one draw's sources are firing_rate_random#<draw>:... until averaged
FLOORS = {"no_latents": "recovery", "mean_update": "recovery_from_mean_update"}  # floor source: its key
FIRST_LATE_POSITION = 3  # judgment metrics are also given from here on (positions 1-2 left out)


def simulator_for(args):
    """The simulator of a WholeLayerArguments: a train/sft.py run's final adapter (a dense format or sim_v1)
    or a prompted sim_v1 baseline (eval/sweep.py's `name=...,model=...` spec)."""
    from latentsim.config.eval import parse_baseline
    from latentsim.prompts import get_format
    from latentsim.simulators import baseline_simulator, final_simulator

    if args.baseline:
        if "predicted" in args.values:
            raise ConfigError("config key `values`: `predicted` needs a value simulator, not a baseline.")
        return baseline_simulator(parse_baseline(args.baseline))
    sim = final_simulator(args.simulator)
    fmt = get_format(sim.prompt_format)
    if not fmt.reads_active or fmt.judgment_format != "sim_v1":
        raise ConfigError(
            f"config key `simulator`: {args.simulator} was trained on {sim.prompt_format!r}; the whole "
            "layer needs Yes/No verdicts (sim_v1 or a dense format that judges like it)."
        )
    if "predicted" in args.values and not fmt.value_bins:
        raise ConfigError(
            "config key `values`: `predicted` needs a value simulator (sim_dense_value_v1 or "
            f"sim_dense_value_k<K>_v1); "
            f"{args.simulator} was trained on {sim.prompt_format!r}."
        )
    return sim


def reference_simulators(names: list[str]) -> dict:
    """{decider (`ref:<name>`): reference Simulator} of WholeLayerArguments' `references`, each built as
    eval/sweep.py builds a `model=<name>` baseline; refused before any model loads when its scorer cannot
    judge whole texts (no `text_p_yes`)."""
    from latentsim.config.eval import parse_baseline
    from latentsim.simulators import REFERENCES, baseline_simulator

    out = {}
    for name in names:
        spec = parse_baseline(f"model={name}")
        if not callable(getattr(REFERENCES.get(name), "text_p_yes", None)):
            able = sorted(k for k, cls in REFERENCES.items() if callable(getattr(cls, "text_p_yes", None)))
            raise ConfigError(
                f"config key `references`: the reference {name!r} cannot judge every position of a text "
                f"(its scorer has no `text_p_yes`); choose from {able}."
            )
        out[f"{REFERENCE}{spec['name']}"] = baseline_simulator(spec)
    return out


def text_of_row(tokens: torch.Tensor, row: int, n_tokens: int, tokenizer):
    """(subject ids [1 + n] with BOS, the decoded text of positions 1..n, each position's character end)."""
    ids = tokens[row, : n_tokens + 1].long()
    window = dense_window(tokenizer, ids[1:].numpy(), [{}] * n_tokens)
    return ids, window.text, window.token_ends


def p_yes_of(logits: np.ndarray) -> np.ndarray:
    """P(yes) [n_tokens, n_latents] from a text's No/Yes logits [n_latents, n_tokens, 2] (text_logits), NaN
    where they are."""
    return (1 / (1 + np.exp(logits[..., 0] - logits[..., 1]))).T.astype(np.float32)


def simulator_p_yes(
    scorer,
    interpretations: list[str],
    texts: list[tuple[str, list[int]]],
    progress=None,
    bin_values: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per text, P(yes) [n_tokens, n_latents] of a dense simulator (renormalised over No/Yes); NaN where
    unaligned. Each interpretation's header is computed once for all the texts. With `bin_values` [n_latents,
    K] (a value simulator): [n_tokens, n_latents, 2], P(active) and the expected activation given active."""
    # A token without a character end (-1) matches no simulator token: text_logits leaves it NaN.
    if bin_values is None:
        return [p_yes_of(logits) for logits in scorer.text_logits(interpretations, texts, progress)]
    from latentsim.simulators.base import probabilities
    from latentsim.values import expected_given_active

    out = []
    for logits in scorer.text_logits(interpretations, texts, progress, bins=True):
        probs = probabilities(logits.astype(np.float64))  # [latents, tokens, 1 + K]
        given = expected_given_active(probs, bin_values[:, None, :])
        out.append(np.stack([1.0 - probs[..., 0], given], axis=-1).transpose(1, 0, 2).astype(np.float32))
    return out


def sim_v1_p_yes(
    scorer,
    interpretations: list[str],
    tokens: torch.Tensor,
    rows: list[int],
    n_tokens: int,
    judged: np.ndarray,
    context_tokens: int,
    tokenizer,
    progress=None,
) -> list[np.ndarray]:
    """Per text, P(yes) [n_tokens, n_latents] of a sim_v1 simulator: one judgment per (judged position,
    latent), the context the `context_tokens` tokens up to the judged one (never BOS), marked as in the eval
    sets; NaN at the positions not judged. Judgments of one position share its context prefix (HFScorer)."""
    from latentsim.prompts import marked_context
    from latentsim.simulators import Judgment, probabilities

    out = []
    for row in rows:
        p = np.full((n_tokens, len(interpretations)), np.nan, dtype=np.float32)
        for j in judged:
            pos = int(j) + 1  # positions 1..n of the row
            window = tokens[row, max(1, pos - context_tokens + 1) : pos + 1].tolist()
            context = marked_context(tokenizer.decode(window[:-1]), tokenizer.decode(window[-1:]))
            logits = scorer.label_logits([Judgment(context, i) for i in interpretations], progress)
            p[j] = probabilities(logits)[:, 1]
        out.append(p)
    return out


def scored_rows(shard_dir: Path, rows: list[int], score: Callable) -> dict[int, np.ndarray]:
    """{row: P(yes) [n_tokens, latents]}: rows saved in `shard_dir` (row<r>.npy) read back, the others scored
    together by `score(todo) -> ([P(yes) per row], timing)` and each saved with the timing of the run that
    scored it (row<r>.json)."""
    shard_dir = Path(shard_dir)
    out = {r: np.load(shard_dir / f"row{r}.npy") for r in rows if (shard_dir / f"row{r}.npy").is_file()}
    todo = [r for r in rows if r not in out]
    if not todo:
        return out
    scores, timing = score(todo)
    for r, p in zip(todo, scores, strict=True):
        atomic_write_bytes(shard_dir / f"row{r}.npy", npy_bytes(p))
        atomic_write_json(shard_dir / f"row{r}.json", timing)
        out[r] = p
    return out


def judge_texts(
    scorer,
    interpretations: list[str],
    tokens: torch.Tensor,
    rows: list[int],
    n_tokens: int,
    tokenizer,
    shard_dir: Path,
    sim_v1: dict | None = None,
    bin_values: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """{row: P(yes) [n_tokens, latents]} of texts, each saved to `shard_dir/row<r>.npy` with the timing of the
    run that judged it (`.json`: the rows judged together, seconds, judgments, judgments/s, tokens computed
    per judgment); finished rows are read back, the others judged together (a dense simulator: each header
    once). `sim_v1` (judged, context_tokens): judged by a sim_v1 simulator at those positions only.
    `bin_values` (a value simulator): each row [n_tokens, latents, 2], P(yes) and the predicted value."""

    def score(todo: list[int]):
        before = dict(scorer.stats)
        start = time.perf_counter()
        if sim_v1 is None:
            texts = [text_of_row(tokens, r, n_tokens, tokenizer)[1:] for r in todo]
            total = len(interpretations) * sum(e >= 0 for _, ends in texts for e in ends)
            with tqdm(total=total, desc=f"judging {len(todo)} texts", unit="judgment") as bar:
                scores = simulator_p_yes(scorer, interpretations, texts, bar, bin_values)
        else:
            total = len(interpretations) * len(sim_v1["judged"]) * len(todo)
            with tqdm(total=total, desc=f"judging {len(todo)} texts (sim_v1)", unit="judgment") as bar:
                scores = sim_v1_p_yes(
                    scorer,
                    interpretations,
                    tokens,
                    todo,
                    n_tokens,
                    sim_v1["judged"],
                    sim_v1["context_tokens"],
                    tokenizer,
                    bar,
                )
        seconds = time.perf_counter() - start
        judged = scorer.stats["judgments"] - before["judgments"]
        computed = scorer.stats["computed_tokens"] - before["computed_tokens"]
        return scores, {
            "rows": todo,
            "seconds": seconds,
            "judgments": judged,
            "judgments_per_s": judged / seconds,
            "computed_tokens_per_judgment": computed / max(judged, 1),
        }

    return scored_rows(shard_dir, rows, score)


def judge_references(
    factory,
    references: dict,
    eval_set: EvalSet,
    interpretations: dict[int, str],
    rows: list[int],
    n_tokens: int,
    tokenizer,
    shard_dir: Path,
    seed: int,
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict]]:
    """Each reference (`reference_simulators`) built through the factory and judging every explained latent
    at every position 1..n of `rows` with its `text_p_yes` (the subject ids with BOS, decoded with the
    subject `tokenizer`), saved per row under shard_dir/<name>/ and read back as `judge_texts` does. Returns
    ({decider: {row: P(yes) [n_tokens, latents]}}, {name: what results.json records about it: its model,
    fit and timing})."""
    explained = sorted(interpretations)
    listed = [interpretations[i] for i in explained]
    scores, about = {}, {}
    for decider, sim in references.items():
        scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=seed))

        def score(todo: list[int], scorer=scorer, decider=decider):
            start, out = time.perf_counter(), []
            for r in tqdm(todo, desc=f"judging {len(todo)} texts ({decider})", unit="text"):
                ids = eval_set.tokens[r, : n_tokens + 1].long().numpy()
                p = np.asarray(scorer.text_p_yes(explained, listed, ids, tokenizer), dtype=np.float32)
                if p.shape != (n_tokens, len(explained)):
                    raise ValueError(
                        f"{type(scorer).__name__}.text_p_yes gave P(yes) of shape {p.shape}, not (positions, "
                        f"latents) = {(n_tokens, len(explained))}."
                    )
                out.append(p)
            seconds, judged = time.perf_counter() - start, len(todo) * n_tokens * len(explained)
            return out, {
                "rows": todo,
                "seconds": seconds,
                "judgments": judged,
                "judgments_per_s": judged / seconds,
            }

        folder = Path(shard_dir) / decider.removeprefix(REFERENCE)
        scores[decider] = scored_rows(folder, rows, score)
        about[decider.removeprefix(REFERENCE)] = {
            "model": sim.base_model,
            "fitted": scorer.describe(),
            "timing": timings(folder, rows),
        }
        factory.release(scorer)
    return scores, about


def timings(shard_dir: Path, rows: list[int]) -> list[dict]:
    """The timings of the runs that judged `rows` (each run's once), as saved beside their scores."""
    runs = {}
    for r in rows:
        timing = json.loads((Path(shard_dir) / f"row{r}.json").read_text())
        runs[json.dumps(timing, sort_keys=True)] = timing
    return list(runs.values())


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (np.save on a path would add its own suffix to a temporary name)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def l0_matched_threshold(p_yes: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """The threshold at which a decider flags as many pairs as are truly active (over all texts given). Where
    P(yes) ties at the k-th largest value (a reference's few distinct values: string match's two), flagging
    the whole tie or none of it, whichever count is nearer k (the tie, when equally near)."""
    p = np.sort(np.concatenate([np.nan_to_num(x, nan=-1.0).ravel() for x in p_yes]))[::-1]
    k = int(sum(t.sum() for t in truth))
    if k == 0:
        return 1.0
    at = p[min(k, len(p)) - 1]
    above = p[p > at]
    with_tie, without = int((p >= at).sum()), len(above)
    if len(above) and k - without < with_tie - k:
        return float(above.min())
    return float(at)


def decisions(p_yes: np.ndarray, thresholds: dict[str, float], decider: str = SIMULATOR) -> dict:
    """{`<decider>@<threshold label>`: flagged [n, n_explained] bool}: P(yes) at or above each threshold (an
    unaligned, NaN, verdict never is)."""
    p = torch.from_numpy(np.nan_to_num(p_yes, nan=-1.0))
    return {f"{decider}@{label}": p >= t for label, t in thresholds.items()}


def chance_decisions(
    firing_rate: torch.Tensor, n_positions: int, draws: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """{`firing_rate_random#<d>`: flagged [n, n_explained]}: `draws` independent draws, one after the other
    from `generator`, each flagging every explained latent at every position with its firing rate."""
    return {
        f"{CHANCE}#{d}": torch.rand((n_positions, len(firing_rate)), generator=generator)
        < firing_rate[None, :]
        for d in range(draws)
    }


def decided_values(
    z: torch.Tensor,
    explained: torch.Tensor,
    flagged: torch.Tensor,
    value: str,
    medians: torch.Tensor,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n, n_explained] values of the explained latents a decider flagged (0 elsewhere): `oracle` (true value
    where truly active, else the latent's median), `median`, or `predicted` ([n, n_explained]: the value
    simulator's own)."""
    true, median = z[:, explained], medians[explained].expand_as(flagged)
    if value == "predicted":
        chosen = predicted.to(device=z.device, dtype=z.dtype)
    else:
        chosen = torch.where(true > 0, true, median) if value == "oracle" else median
    return torch.where(flagged.to(z.device), chosen, torch.zeros_like(chosen))


def layer_sources(
    z: torch.Tensor,
    explained: torch.Tensor,
    flagged: dict[str, torch.Tensor],
    values: list[str],
    medians: torch.Tensor,
    sae,
    trained: torch.Tensor | None = None,
    mean_update: torch.Tensor | None = None,
    predicted: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{source: layer output [n, d]} (module docstring); z [n, W] the true latents, `explained` the latent ids
    the simulator judges, flagged[...] [n, len(explained)]. `trained` [len(explained)] bool: which explained
    latents the simulator trained on (adds the simulator's held-out-only sources); `mean_update` [d]: the
    `mean_update` source's output at every position; `predicted` [n, len(explained)]: the simulator's values
    (the `predicted` value applies to the simulator's decisions only)."""
    unexplained = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    unexplained[explained] = False
    kept = z * unexplained
    out = {
        "sae": sae.decode(z),
        "sae:explained_only": sae.decode(z - kept),
        "no_latents": sae.decode(torch.zeros_like(z)),
    }
    if mean_update is not None:
        out["mean_update"] = mean_update.to(out["sae"].dtype).expand_as(out["sae"])
    if trained is not None:
        trained_ids = explained[trained.to(explained.device)]
        held = z - kept
        held[:, trained_ids] = 0
        out["sae:held_out_only"] = sae.decode(held)
    for name, f in flagged.items():
        for value in values:
            if value == "predicted" and not name.startswith(f"{SIMULATOR}@"):
                continue
            zs = torch.zeros_like(z)
            zs[:, explained] = decided_values(z, explained, f, value, medians, predicted)
            variants = {"": zs}
            if trained is not None and name.startswith(f"{SIMULATOR}@"):
                for trained_how in ("kept", "zeroed"):
                    variant = zs.clone()
                    variant[:, trained_ids] = z[:, trained_ids] if trained_how == "kept" else 0
                    variants[f":held_out_only:trained_{trained_how}"] = variant
            for suffix, latents in variants.items():
                out[f"{name}:{value}:unexplained_zeroed{suffix}"] = sae.decode(latents)
                out[f"{name}:{value}:unexplained_kept{suffix}"] = sae.decode(latents + kept)
    return out


def mean_update_vector(z_calibration: list[torch.Tensor], sae) -> torch.Tensor:
    """The `mean_update` layer output [d]: the SAE decoder applied to the mean latent vector over every
    position of the calibration texts (z [n, W] each); the decoder is affine, so this is their mean
    reconstruction too."""
    return sae.decode(torch.cat(z_calibration).mean(0, keepdim=True))[0]


@torch.no_grad()
def patch_text(
    model,
    sae,
    ids: torch.Tensor,
    next_ids: torch.Tensor,
    layer: int,
    build_sources,
    judged: np.ndarray | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], torch.Tensor, np.ndarray]:
    """KL(p_clean || p_patched) and CE of the next token at positions 1..n for every source;
    `build_sources(z)` gives {source: [n, d]} from the true latents z [n, W]. Returns
    ({source: (kl [n], ce [n])}, z, clean CE [n]). With `judged` (indices into 0..n-1) only those positions
    are patched (the others keep the clean layer output) and measured: kl, ce and clean CE are
    [len(judged)]."""
    logits, _, x_out, _ = clean_pass(model, ids, layer)
    z = sae.encode(x_out[1:].to(sae.W_dec.dtype))
    sources = build_sources(z)
    if judged is not None:
        clean, at = x_out[1:], torch.as_tensor(judged, device=x_out.device)
        sources = {k: clean.clone().index_copy_(0, at, v[at].to(clean.dtype)) for k, v in sources.items()}
    names = list(sources)
    out = {}
    for a in range(0, len(names), PATCH_CHUNK):
        chunk = names[a : a + PATCH_CHUNK]
        patched = all_positions_logits(model, ids, layer, torch.stack([sources[k] for k in chunk]))[:, 1:]
        kl, ce = kl_and_ce(logits[1:], patched, next_ids)
        for j, k in enumerate(chunk):
            out[k] = (kl[j].cpu().numpy(), ce[j].cpu().numpy())
    clean_ce = kl_and_ce(logits[1:], logits[None, 1:], next_ids)[1][0].cpu().numpy()
    if judged is not None:
        out = {k: (kl[judged], ce[judged]) for k, (kl, ce) in out.items()}
        clean_ce = clean_ce[judged]
    return out, z, clean_ce


def average_draws(per_source: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict, dict[str, np.ndarray]]:
    """Chance draws (`firing_rate_random#<d>:<variant>`) replaced by their per-position mean
    (`firing_rate_random:<variant>`), after the other sources. Returns (the sources, {variant: each draw's KL
    [draws, positions]})."""
    out, draws = {}, {}
    for name, kl_ce in per_source.items():
        head, _, variant = name.partition(":")
        if head.startswith(f"{CHANCE}#"):
            draws.setdefault(variant, []).append(kl_ce)
        else:
            out[name] = kl_ce
    for variant, runs in draws.items():
        out[f"{CHANCE}:{variant}"] = tuple(np.mean([r[i] for r in runs], axis=0) for i in (0, 1))
    return out, {variant: np.stack([kl for kl, _ in runs]) for variant, runs in draws.items()}


def controlled_share(
    z: torch.Tensor, explained: torch.Tensor, decoder_norms: torch.Tensor
) -> dict[str, float]:
    """Of the SAE's active latents (mean over positions): the share the simulator judges (explained), by count
    and by decoded norm (sum of activation x |decoder row|)."""
    active = z > 0
    mask = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
    mask[explained] = True
    weight = z * decoder_norms[None, :]
    return {
        "active_latents": float(active.sum(1).float().mean()),
        "share_of_active_latents": float((active & mask).sum() / active.sum().clamp(min=1)),
        "share_of_decoded_norm": float(weight[:, mask].sum() / weight.sum().clamp(min=1e-12)),
    }


def mean_ci(values: np.ndarray, clusters: np.ndarray, seed: int) -> dict:
    """Mean over positions with a 95% bootstrap interval resampling `clusters` (blocks of positions)."""
    codes = np.unique(clusters, return_inverse=True)[1]
    sums, counts = np.bincount(codes, weights=values), np.bincount(codes).astype(float)
    drawn = bootstrap_counts(len(sums), N_BOOT, seed)  # [resamples, clusters]: the metrics module's draws
    low, high = percentile_interval(drawn @ sums / (drawn @ counts))
    return {"mean": float(values.mean()), "ci95": [low, high], "n_positions": int(len(values))}


def recovery(floor, ceiling, kl) -> np.ndarray:
    """(floor - kl) / (floor - ceiling): 0 at the floor's KL, 1 at the SAE's; NaN where the two are equal."""
    floor, ceiling, kl = (np.asarray(x, dtype=float) for x in (floor, ceiling, kl))
    gap = floor - ceiling
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (floor - kl) / gap, np.nan)


def summarise_sources(
    kl_ce: dict[str, dict[str, np.ndarray]], clusters: np.ndarray, texts: np.ndarray, seed: int
) -> dict:
    """Per source: mean KL and CE over every position of every text (`texts`: each position's text) with 95%
    CIs resampling whole texts (`ci95_texts`, None with one text) and blocks of positions (`ci95`, over
    `clusters`); the recovery from each floor present (FLOORS) with its CI over texts, every source's from the
    same resamples of texts (floor and ceiling resampled with it)."""
    codes = np.unique(texts, return_inverse=True)[1]
    n_texts = int(codes.max()) + 1
    drawn = bootstrap_counts(n_texts, N_BOOT, seed) if n_texts > 1 else None
    out, replicates = {}, {}
    for name, v in kl_ce.items():
        rec = {}
        for key in ("kl", "ce"):
            rec[key] = {**mean_ci(v[key], clusters, seed), "ci95_texts": None, "n_texts": n_texts}
            if drawn is not None:
                sums = np.bincount(codes, weights=v[key], minlength=n_texts)
                draws = drawn @ sums / (drawn @ np.bincount(codes, minlength=n_texts).astype(float))
                rec[key]["ci95_texts"] = list(percentile_interval(draws))
                replicates[name, key] = draws
        out[name] = rec
    for floor, key in FLOORS.items():
        if floor not in out:
            continue
        low, high = out[floor]["kl"]["mean"], out["sae"]["kl"]["mean"]
        for name, rec in out.items():
            rec[key] = float(recovery(low, high, rec["kl"]["mean"]))
            rec[f"{key}_ci95_texts"] = (
                list(
                    percentile_interval(
                        recovery(replicates[floor, "kl"], replicates["sae", "kl"], replicates[name, "kl"])
                    )
                )
                if drawn is not None
                else None
            )
    return out


def chance_spread(per_draw_kl: dict[str, np.ndarray], sources: dict) -> dict:
    """Per chance variant (`firing_rate_random:<variant>`): each draw's mean KL over every position of every
    text ([draws, positions] in), its recovery from `no_latents`, and their mean, std, min and max (the mean
    is the averaged source's recovery; the spread is what one draw alone would have risked)."""
    floor, ceiling = sources["no_latents"]["kl"]["mean"], sources["sae"]["kl"]["mean"]
    out = {}
    for variant, kl in per_draw_kl.items():
        per_draw = kl.mean(axis=1)
        rec = recovery(floor, ceiling, per_draw)
        out[f"{CHANCE}:{variant}"] = {
            "draws": int(len(per_draw)),
            "kl_per_draw": per_draw.tolist(),
            "recovery_per_draw": rec.tolist(),
            "recovery_mean": float(rec.mean()),
            "recovery_std": float(rec.std(ddof=1)) if len(rec) > 1 else 0.0,
            "recovery_min": float(rec.min()),
            "recovery_max": float(rec.max()),
        }
    return out


def judgment_metrics(
    p_yes: np.ndarray,
    truth: np.ndarray,
    trained: np.ndarray,
    firing_rate: np.ndarray,
    thresholds: dict[str, float],
    seed: int,
) -> dict:
    """Over every (position, explained latent) of the texts: pooled AUC of the simulator and of the
    firing-rate prior, per-latent AUC (positions where a latent fires vs those where it does not; the prior's
    is 0.5 by construction), recall / precision / flagged per position at each threshold; for all latents and
    split by whether the simulator trained on them. p_yes, truth [positions, latents]; trained [latents]
    bool."""
    out = {}
    for group, cols in (("all", np.ones_like(trained)), ("trained_on", trained), ("held_out", ~trained)):
        if not cols.any():
            continue
        p, t = p_yes[:, cols], truth[:, cols]
        finite = np.isfinite(p)
        prior = np.broadcast_to(firing_rate[cols][None, :], p.shape)
        per_latent = np.array([roc_auc(p[finite[:, j], j], t[finite[:, j], j]) for j in range(p.shape[1])])
        defined = per_latent[np.isfinite(per_latent)]
        rec = {
            "latents": int(cols.sum()),
            "pairs": int(finite.sum()),
            "positives": int(t[finite].sum()),
            "auc_pooled": roc_auc(p[finite], t[finite]),
            "prior_auc_pooled": roc_auc(prior[finite], t[finite]),
            "per_latent_auc": {
                "median": float(np.median(defined)) if len(defined) else float("nan"),
                "ci95": list(bootstrap_ci(defined, seed=seed)),
                "latents": int(len(defined)),
            },
            "thresholds": {},
        }
        for label, th in thresholds.items():
            flagged = np.nan_to_num(p, nan=-1.0) >= th
            tp = int((flagged & (t == 1)).sum())
            rec["thresholds"][label] = {
                "threshold": th,
                "flagged_per_position": float(flagged.sum(1).mean()),
                "active_per_position": float(t.sum(1).mean()),
                "recall": tp / max(int(t.sum()), 1),
                "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
            }
        out[group] = rec
    return out


def judgments_by_position(
    p_yes: np.ndarray,
    truth: np.ndarray,
    positions: np.ndarray,
    trained: np.ndarray,
    firing_rate: np.ndarray,
    thresholds: dict[str, float],
    seed: int,
) -> dict:
    """{`judgments`: judgment_metrics over every judged position, `judgments_from_position_3`: the same
    without positions 1-2 (None when no later position was judged)}; `positions` [rows of p_yes]: each row's
    position in its text."""
    late = positions >= FIRST_LATE_POSITION
    return {
        "judgments": judgment_metrics(p_yes, truth, trained, firing_rate, thresholds, seed),
        "judgments_from_position_3": (
            judgment_metrics(p_yes[late], truth[late], trained, firing_rate, thresholds, seed)
            if late.any()
            else None
        ),
    }


def held_out_rows(eval_set: EvalSet, split: str, n: int, seed: int, trained_rows: set[int]) -> list[int]:
    """A seeded choice of `n` of the eval set's `split` rows, refused if any of its rows trained the
    simulator."""
    rows = sorted(set(eval_set.split(split)["row"].tolist()))
    if overlap := sorted(set(rows) & trained_rows):
        raise BadInputError(
            f"config key `eval_set`: {len(overlap)} of its {split} rows (e.g. {overlap[:5]}) are in the "
            "simulator's training data; build both with the same cache, seed and split fractions."
        )
    if len(rows) < n:
        raise ConfigError(
            f"config key `{'texts' if split != 'validation' else 'calibration_texts'}`: the eval set has "
            f"{len(rows)} {split} rows, fewer than {n}."
        )
    return sorted(np.random.default_rng(seed).choice(rows, n, replace=False).tolist())


def measure(
    args,
    subject,
    sae,
    eval_set: EvalSet,
    rows: list[int],
    calibration: list[int],
    explained: list[int],
    scores: dict[str, dict[int, np.ndarray]],
    trained_latents: set[int],
    about_references: dict[str, dict] | None = None,
    predicted: dict[int, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Every source patched into every text and summarised (module docstring). `scores`: {decider: {row:
    P(yes) [tokens, explained]}}, the simulator's under SIMULATOR, each reference's under `ref:<name>` and the
    two-stage deciders under their names (latentsim.first_stage; calibration rows too when `l0_matched` is
    asked for); `trained_latents`: the latent ids the simulator trained on; `about_references`: {name: what
    results.json records about it (judge_references, first_stage.judge_whole_layer)};
    `predicted`: {row: [n_tokens, explained]} a value simulator's values (the `predicted` sources). Returns
    (the per-position table: row, position, source, kl, ce; results.json's measured part)."""
    tokens, n, layer = eval_set.tokens, args.tokens, eval_set.layer
    device = next(subject.parameters()).device
    explained_t = torch.tensor(explained, device=device)
    firing_rate = eval_set.statistics["firing_rate"][explained].float()
    medians = eval_set.decile_edges(device)[:, 5]
    judged = np.arange(n) if args.positions == "all" else np.array([n - 1])
    trained = np.array([lat in trained_latents for lat in explained], dtype=bool)

    def true_latents(row: int) -> torch.Tensor:
        _, _, x_out, _ = clean_pass(subject, tokens[row, : n + 1].long().to(device), layer)
        return sae.encode(x_out[1:].to(sae.W_dec.dtype))

    z_calibration = [true_latents(r) for r in calibration]
    cal_truth = [(z[judged][:, explained_t] > 0).cpu().numpy() for z in z_calibration]
    thresholds = {}
    for decider, by_row in scores.items():
        thresholds[decider] = {t: float(t) for t in args.thresholds if t != "l0_matched"}
        if "l0_matched" in args.thresholds:
            cal_p = [by_row[r][judged] for r in calibration]
            thresholds[decider]["l0_matched"] = l0_matched_threshold(cal_p, cal_truth)
    mean_update = mean_update_vector(z_calibration, sae) if z_calibration else None
    held_out_only = torch.from_numpy(trained) if trained.any() else None

    gen = torch.Generator().manual_seed(args.seed)
    decoder_norms = sae.W_dec.norm(dim=1)
    records, shares, draws, truth, stacks = [], [], {}, [], {d: [] for d in scores}
    for row in tqdm(rows, desc=f"patching {len(rows)} texts", unit="text"):
        flagged = {}
        for decider, by_row in scores.items():
            flagged |= decisions(by_row[row], thresholds[decider], decider)
        flagged |= chance_decisions(firing_rate, n, args.chance_draws, gen)
        per_source, z, clean_ce = patch_text(
            subject,
            sae,
            tokens[row, : n + 1].long().to(device),
            tokens[row, 2 : n + 2].long().to(device),
            layer,
            lambda z, flagged=flagged, row=row: layer_sources(
                z,
                explained_t,
                flagged,
                args.values,
                medians,
                sae,
                held_out_only,
                mean_update,
                torch.from_numpy(predicted[row]) if predicted is not None else None,
            ),
            None if args.positions == "all" else judged,
        )
        per_source, per_draw = average_draws(per_source)
        for variant, kl in per_draw.items():
            draws.setdefault(variant, []).append(kl)
        truth.append((z[judged][:, explained_t] > 0).cpu().numpy())
        for decider, by_row in scores.items():
            stacks[decider].append(by_row[row][judged])
        shares.append(controlled_share(z[judged], explained_t, decoder_norms))
        for source, (kl, ce) in {"clean": (np.zeros(len(judged)), clean_ce), **per_source}.items():
            records += [
                {"row": row, "position": int(j) + 1, "source": source, "kl": float(kl[i]), "ce": float(ce[i])}
                for i, j in enumerate(judged)
            ]

    table = pd.DataFrame(records)
    sources = summarise_table(table, args.seed)
    truth_stack, positions = np.concatenate(truth), np.tile(judged + 1, len(rows))
    judgments = {
        decider: judgments_by_position(
            np.concatenate(stacks[decider]),
            truth_stack,
            positions,
            trained,
            firing_rate.numpy(),
            thresholds[decider],
            args.seed,
        )
        for decider in scores
    }
    calibration_positions = sum(len(z) for z in z_calibration)
    measured = {
        "texts": len(rows),
        "thresholds": thresholds[SIMULATOR],
        "sources": sources,
        "chance": chance_spread({v: np.concatenate(kl, axis=1) for v, kl in draws.items()}, sources),
        "mean_update": {
            "calibration_positions": calibration_positions,
            "what": "the SAE decoder applied to the mean latent vector over the calibration texts' positions",
        }
        if mean_update is not None
        else None,
        "held_out_only": {
            "trained_on_latents": int(trained.sum()),
            "held_out_latents": int((~trained).sum()),
            "sources": held_out_only is not None,
        },
        "controlled": {k: float(np.mean([s[k] for s in shares])) for k in shares[0]},
        **judgments[SIMULATOR],
        "references": {
            d.removeprefix(REFERENCE): {
                **(about_references or {}).get(d.removeprefix(REFERENCE), {}),
                "thresholds": thresholds[d],
                **judgments[d],
            }
            for d in scores
            if d.startswith(REFERENCE)
        },
        # The two-stage deciders (latentsim.first_stage): the first stage alone, and the simulator judging
        # only what it proposes.
        "stages": {
            d: {
                **(about_references or {}).get(d, {}),
                "thresholds": thresholds[d],
                **judgments[d],
                "recovery_minus_sim": versus_simulator(table, sources, d, args.seed),
            }
            for d in scores
            if d != SIMULATOR and not d.startswith(REFERENCE)
        },
    }
    return table, measured


def versus_simulator(table: pd.DataFrame, sources: dict, decider: str, seed: int) -> dict:
    """{`<threshold>:<values>:<variant>`: the recovery of `decider@...` minus the simulator's `sim@...` of the
    same suffix (recovery_difference)} for every suffix both have."""
    out = {}
    for name in sources:
        suffix = name.partition("@")[2]
        if name.startswith(f"{decider}@") and f"{SIMULATOR}@{suffix}" in sources:
            out[suffix] = recovery_difference(table, name, f"{SIMULATOR}@{suffix}", seed)
    return out


def recovery_difference(table: pd.DataFrame, a: str, b: str, seed: int) -> dict:
    """Recovery (from `no_latents`) of source `a` minus source `b`, with a 95% CI resampling whole texts: both
    recoveries (floor and ceiling too) from the same resamples, so the interval is of the paired difference.
    None for the interval with one text."""
    kl = table.pivot_table(index="row", columns="source", values="kl", aggfunc="sum")
    counts = table[table["source"] == "clean"].groupby("row").size().reindex(kl.index).to_numpy(float)

    def diff(weights: np.ndarray) -> np.ndarray:
        mean = {s: weights @ kl[s].to_numpy() / (weights @ counts) for s in ("no_latents", "sae", a, b)}
        floor, ceiling = mean["no_latents"], mean["sae"]
        return recovery(floor, ceiling, mean[a]) - recovery(floor, ceiling, mean[b])

    point = float(diff(np.ones((1, len(kl))))[0])
    if len(kl) < 2:
        return {"mean": point, "ci95_texts": None, "n_texts": len(kl)}
    low, high = percentile_interval(diff(bootstrap_counts(len(kl), N_BOOT, seed).astype(float)))
    return {"mean": point, "ci95_texts": [low, high], "n_texts": int(len(kl))}


def judgment_lines(who: str, groups: dict, late: dict | None) -> list[str]:
    """The printed lines of one decider's judgment metrics: per group of latents (a group no smaller than all
    of them is not repeated), over all positions and then without positions 1-2."""

    def aucs(g: dict) -> str:
        per = g["per_latent_auc"]
        return (
            f"pooled AUC {g['auc_pooled']:.3f} (firing-rate prior {g['prior_auc_pooled']:.3f}); "
            f"per-latent AUC {per['median']:.3f} [{per['ci95'][0]:.3f}, {per['ci95'][1]:.3f}] over "
            f"{per['latents']} that fire"
        )

    lines = []
    for group, g in groups.items():
        if group != "all" and g["latents"] == groups["all"]["latents"]:
            continue
        at = "; ".join(
            f"{k} (p >= {v['threshold']:.3g}): {v['flagged_per_position']:.1f} flagged per position for "
            f"{v['active_per_position']:.1f} active, recall {v['recall']:.2f}"
            for k, v in g["thresholds"].items()
        )
        lines.append(f"  {who}, {group} latents ({g['latents']}): {aucs(g)} (prior: 0.5); {at}")
        if late and group in late:
            lines.append(f"      without positions 1-2: {aucs(late[group])}")
    return lines


def summary_lines(result: dict) -> list[str]:
    """What eval/whole_layer.py prints after its table of sources: chance's spread over draws, what
    `mean_update` is, the held-out-only split, the simulator's and each reference's judgment metrics."""
    lines = []
    for name, c in (result.get("chance") or {}).items():
        lines.append(
            f"  {name}: mean of {c['draws']} draws; one draw's recovery {c['recovery_mean']:.2f} on average "
            f"(std {c['recovery_std']:.2f}, min {c['recovery_min']:.2f}, max {c['recovery_max']:.2f})"
        )
    if "mean_update" in result:
        m = result["mean_update"]
        lines.append(
            f"  mean_update: {m['what']} ({m['calibration_positions']} positions)"
            if m
            else "  mean_update: none (no calibration texts)"
        )
    if h := result.get("held_out_only"):
        lines.append(
            f"  held_out_only: the simulator trained on {h['trained_on_latents']} of the explained latents, "
            f"not on {h['held_out_latents']}"
            + ("" if h["sources"] else " (no held-out-only sources: they equal the simulator's own)")
        )
    lines += judgment_lines("simulator", result["judgments"], result.get("judgments_from_position_3"))
    for name, ref in (result.get("references") or {}).items():
        th = ", ".join(f"{k} p >= {v:.3g}" for k, v in ref["thresholds"].items())
        seconds = sum(t["seconds"] for t in ref.get("timing", []))
        lines.append(f"  reference {name} ({ref.get('model', name)}; {th}; judged in {seconds:.0f} s)")
        lines += judgment_lines(f"reference {name}", ref["judgments"], ref.get("judgments_from_position_3"))
    for name, stage in (result.get("stages") or {}).items():
        th = ", ".join(f"{k} p >= {v:.3g}" for k, v in stage["thresholds"].items())
        t = stage.get("timing", [])
        seconds, texts = sum(x["seconds"] for x in t), sum(len(x["rows"]) for x in t)
        cost = f"{seconds / max(texts, 1):.1f} s per text"
        if name == "two_stage" and t:
            judged, every = sum(x["judgments"] for x in t), sum(x["all_judgments"] for x in t)
            first = sum(x["first_stage_seconds"] for x in t)
            computed = sum(x["computed_tokens"] for x in t) / max(sum(x["all_computed_tokens"] for x in t), 1)
            share = 100 * first / max(seconds, 1e-9)
            cost += (
                f"; {judged} of {every} judgments ({every / max(judged, 1):.1f}x fewer), computed tokens "
                f"{computed:.3f} of judging every latent; first stage {share:.1f}% of the time"
            )
        if "proposed_latents_per_text" in stage:
            proposed, size = stage["proposed_latents_per_text"], stage["dictionary"]
            per_text = f"{proposed:.0f} of {size} latents proposed a text"
            cost += f"; {per_text}" if t else ""
        if not t and "all_dense_judgments" in stage:  # from the full judge (first_stage.derived_two_stage)
            fewer = stage["all_dense_judgments"] / max(stage["dense_judgments"], 1)
            recall = stage["recall_truly_active"]
            cost = f"{fewer:.1f}x fewer judgments, {per_text}, {100 * recall:.0f}% of the truly active pairs"
        lines.append(f"  {name} ({stage.get('model', name)}; {th}; {cost})")
        diffs = stage.get("recovery_minus_sim") or {}
        diffs = {k: v for k, v in diffs.items() if "unexplained_zeroed" in k}
        if diffs:
            shown = [
                f"{k.partition(':unexplained')[0]} {v['mean']:+.3f}"
                + (" [{:+.2f}, {:+.2f}]".format(*v["ci95_texts"]) if v["ci95_texts"] else "")
                for k, v in diffs.items()
            ]
            lines.append(f"    recovery minus the simulator's, paired over texts: {'; '.join(shown)}")
        lines += judgment_lines(name, stage["judgments"], stage.get("judgments_from_position_3"))
    return lines


def texts_note(result: dict) -> str:
    """How the intervals were drawn: over how many texts (none with one text), and over blocks."""
    n = next(iter(result["sources"].values()))["kl"].get("n_texts")
    if n is None:
        over = f"95% CIs over blocks of {BLOCK} positions (these older results have none over texts)"
    elif n == 1:
        over = f"no CI over texts (1 text); 95% CIs over blocks of {BLOCK} positions"
    else:
        over = f"95% CIs resample the {n} texts (beside them: over blocks of {BLOCK} positions)"
    return f"KL(p_clean || p_patched) and CE, mean over positions; {over}"


def header_lines(result: dict) -> list[str]:
    """What was measured: the texts and judging speed, then the controlled share and how the intervals were
    drawn."""
    t, c = result["timing"], result["controlled"]
    at = "its last position" if result.get("positions") == "last" else "every position"
    return [
        f"{len(result['rows'])} held-out texts x {result['tokens_per_text']} positions; every one of "
        f"{result['explained_latents']} explained latents judged by {result['prompt_format']} at {at} "
        f"({sum(x['seconds'] for x in t) / sum(len(x['rows']) for x in t):.0f} s per text, "
        f"{sum(x['judgments'] for x in t) / sum(x['seconds'] for x in t):.0f} judgments/s, "
        f"{np.mean([x['computed_tokens_per_judgment'] for x in t]):.2f} tokens computed per judgment)",
        f"the simulator judges {100 * c['share_of_active_latents']:.0f}% of the SAE's active latents "
        f"({100 * c['share_of_decoded_norm']:.0f}% of their decoded norm; "
        f"{c['active_latents']:.1f} active per position); {texts_note(result)}",
    ]


def headline(result: dict) -> str:
    """header_lines as one paragraph with what recovery is (eval/report.py's caption of the table)."""
    return (
        "; ".join(header_lines(result))
        + "; recovery = (KL_floor - KL) / (KL_floor - KL_sae), the floor `no_latents` or `mean_update`."
    )


def format_table(result: dict) -> str:
    """What eval/whole_layer.py prints: header_lines, KL/CE per source, then summary_lines."""
    first, second = header_lines(result)
    rows = whole_layer_rows(result)
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = [f"[whole_layer] {first}", f"  {second}"]
    lines.append("  " + " ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    lines += ["  " + " ".join(r[k].ljust(w) for k, w in widths.items()).rstrip() for r in rows]
    return "\n".join(lines + summary_lines(result))


def finished_results(out: Path, args) -> dict | None:
    """The results of a finished run of the same WholeLayerArguments in `out` (None when there are none yet;
    finished texts' scores stay for the rerun); `overwrite` empties the folder first, another config is
    refused."""
    from latentsim.io import read_results, require_same_config

    if args.overwrite:
        for path in [out / "results.json", out / "per_position.parquet", out / "run_config.json"]:
            path.unlink(missing_ok=True)
        shutil.rmtree(out / "scores", ignore_errors=True)
    if not (out / "run_config.json").is_file():
        return None
    require_same_config(
        out,
        {"whole_layer": args},
        {"whole_layer.overwrite"},
        "whole-layer results",
        "pass --overwrite true or choose another output_dir",
    )
    return read_results(out)


def summarise_table(table, seed: int) -> dict:
    """summarise_sources of the per-position table (row, position, source, kl, ce): CIs over texts (rows) and
    over blocks of BLOCK consecutive positions of one text."""
    kl_ce = {
        s: {"kl": g["kl"].to_numpy(), "ce": g["ce"].to_numpy()}
        for s, g in table.groupby("source", sort=False)
    }
    blocks = table[table["source"] == "clean"]
    clusters = (blocks["row"] * 10_000 + (blocks["position"] - 1) // BLOCK).to_numpy()
    return summarise_sources(kl_ce, clusters, blocks["row"].to_numpy(), seed)
