"""The first stage of a two-stage whole layer (issue 32): every (latent, token) pair scored cheaply, and the
candidates it proposes handed to the dense judge.

Judging every latent at every token costs one pass over the text per latent. The first stage costs one pass
per text and one per interpretation, whatever the dictionary's size:

- **token vectors**: one pass of the simulator's model over a text alone (its leading special tokens, then
  the text as the dense format tokenizes it, prompts.dense_text_ids), the hidden state at the simulator token
  that ends where each subject token ends (the dense format's reading position); unaligned tokens get none
  and are never proposed;
- **interpretation vectors**: one pass over each interpretation's dense header alone (prompts.dense_header),
  the mean of its hidden states; computed once per dictionary and model, saved under
  `interpretation_vectors/<key>.safetensors` and read back (`interpretation_vectors`);
- **the head** (`BilinearHead`): a low-rank bilinear score of the two standardised vectors plus a weight on
  the latent's log firing rate (training rows' statistics), P(yes) = sigmoid(score). Trained with binary
  cross-entropy on the cache's labels: every training latent at every token of the training rows, the rows
  and latents the dense simulator trained on (latentsim.held_out), nothing else;
- **proposals**: the top-k latents per token (`top_k`), k chosen on validation texts by a recall target
  (`k_for_recall`), or the top-k latents of a text at every token (`propose`).

The encoder and the head are latentsim.simulators.first_stage's, where the first stage is also a simulator
kind of its own (scored by eval/sweep.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latentsim.held_out import training_rows_and_latents
from latentsim.io import atomic_save
from latentsim.metrics import sigmoid
from latentsim.prompts import dense_text_ids

# The encoder, the head and its files live with the `first_stage` simulator kind (latentsim.simulators); the
# stage reads them from here too.
from latentsim.simulators.first_stage import (  # noqa: F401  (save_head, model_identity: train/first_stage.py)
    BilinearHead,
    Encoder,
    leading_ids,
    load_head,
    log_firing_rate,
    model_identity,
    require_trained_for,
    save_head,
)

RECALL_KS = (8, 32, 128)  # the k per token
TWO_STAGE, FIRST_STAGE = "two_stage", "first_stage"  # the whole layer's deciders: two_stage@<threshold>, ...


def dictionary_key(identity: dict, interpretations: list[str]) -> str:
    """What makes a set of interpretation vectors: the model (base, adapter weights' digest, layer, format)
    and every interpretation, in order."""
    payload = json.dumps({"identity": identity, "interpretations": interpretations}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def interpretation_vectors(
    encoder: Encoder, interpretations: list[str], folder: Path, identity: dict
) -> tuple[np.ndarray, Path]:
    """The interpretation vectors of a dictionary: read from `folder/<key>.safetensors` when this model has
    computed them for these interpretations, else computed once and saved there (atomically)."""
    path = Path(folder) / f"{dictionary_key(identity, interpretations)}.safetensors"
    if path.is_file():
        return load_file(path)["vectors"].numpy(), path
    vectors = encoder.interpretation_vectors(interpretations)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"identity": json.dumps(identity, sort_keys=True), "n": str(len(interpretations))}
    atomic_save(path, lambda tmp: save_file({"vectors": torch.from_numpy(vectors)}, tmp, metadata=metadata))
    return vectors, path


def top_k(scores: np.ndarray, k: int, aligned: np.ndarray | None = None) -> np.ndarray:
    """[T, L] bool: the k highest-scoring latents at each token (every latent when k >= L); none at an
    unaligned token."""
    n_latents = scores.shape[1]
    proposed = np.zeros(scores.shape, dtype=bool)
    if k >= n_latents:
        proposed[:] = True
    elif k > 0:
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        np.put_along_axis(proposed, best, True, axis=1)
    if aligned is not None:
        proposed[~aligned] = False
    return proposed


def ranks_of_positives(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The rank (0 = best) of each true pair among its token's scores: scores and truth [T, L]; ties count
    against the positive (a latent tied with it ranks ahead)."""
    t, j = np.nonzero(truth)
    return (scores[t] >= scores[t, j][:, None]).sum(axis=1) - 1


def recall_at(ranks: np.ndarray, ks) -> dict[str, float]:
    """Share of true pairs ranked within the top k, per k."""
    return {str(k): float((ranks < k).mean()) if len(ranks) else float("nan") for k in ks}


def k_for_recall(ranks: np.ndarray, target: float, n_latents: int) -> int:
    """The smallest k whose top-k holds at least `target` of the true pairs (`n_latents` when none can)."""
    if not len(ranks):
        return n_latents
    k = int(np.ceil(np.quantile(ranks + 1, target, method="inverted_cdf")))
    return min(max(k, 1), n_latents)


def active_pairs(cache, rows: list[int], latents: list[int], n_tokens: int) -> dict[int, np.ndarray]:
    """{row: [n_pairs, 2] (token index 0..n_tokens-1 = position - 1, latent column in `latents`)} of the
    cached non-zeros among `latents` at positions 1..n_tokens (a latentsim.cache_reader.CacheReader)."""
    selected = cache.select(np.asarray(sorted(rows)))
    loc = selected.locations.numpy()
    column = np.full(int(max(latents)) + 1 if latents else 0, -1, dtype=np.int64)
    column[np.asarray(latents, dtype=np.int64)] = np.arange(len(latents))
    lat = loc[:, 2]
    keep = (lat < len(column)) & (loc[:, 1] >= 1) & (loc[:, 1] <= n_tokens)
    keep[keep] &= column[lat[keep]] >= 0
    out = {r: np.zeros((0, 2), dtype=np.int64) for r in rows}
    for r in np.unique(loc[keep, 0]):
        mine = keep & (loc[:, 0] == r)
        out[int(r)] = np.column_stack([loc[mine, 1] - 1, column[lat[mine]]])
    return out


def training_pairs(
    pairs: list[np.ndarray], encoded: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(token vectors [N, d] of every aligned position of the texts, their true pairs [P, 2] (row in the
    vectors, latent column)) from each text's active_pairs and token_vectors."""
    tokens, positives, offset = [], [], 0
    for text_pairs, (vectors, aligned) in zip(pairs, encoded, strict=True):
        index = np.cumsum(aligned) - 1  # each aligned position's row among the text's kept vectors
        kept = text_pairs[aligned[text_pairs[:, 0]]]
        tokens.append(vectors[aligned])
        positives.append(np.column_stack([offset + index[kept[:, 0]], kept[:, 1]]))
        offset += int(aligned.sum())
    return np.concatenate(tokens), np.concatenate(positives)


def dense_truth(pairs: np.ndarray, n_tokens: int, n_latents: int) -> np.ndarray:
    """[n_tokens, n_latents] bool from active_pairs' rows."""
    truth = np.zeros((n_tokens, n_latents), dtype=bool)
    truth[pairs[:, 0], pairs[:, 1]] = True
    return truth


def fit_head(
    tokens: np.ndarray,
    positives: np.ndarray,
    interpretations: np.ndarray,
    log_rate: np.ndarray,
    rank: int,
    epochs: int,
    learning_rate: float,
    batch_tokens: int,
    seed: int,
    progress=None,
) -> tuple[BilinearHead, list[float]]:
    """A BilinearHead fitted by binary cross-entropy over every (token, latent) pair: `tokens` [N, d] (aligned
    training tokens), `positives` [P, 2] (token index, latent column) its true pairs among the
    `interpretations` [L, d] with `log_rate` [L]. Adam, shuffled token batches; returns the head and each
    epoch's mean loss."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, g = torch.from_numpy(tokens).float(), torch.from_numpy(interpretations).float()
    rate = torch.from_numpy(log_rate).float()
    head = BilinearHead(x.shape[1], g.shape[1], rank)
    head.standardise_from(x, g)
    truth = torch.zeros(len(x), len(g), dtype=torch.bool)
    truth[torch.from_numpy(positives[:, 0]), torch.from_numpy(positives[:, 1])] = True
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    losses = []
    for _ in range(epochs):
        order, total = torch.from_numpy(rng.permutation(len(x))), 0.0
        for a in range(0, len(x), batch_tokens):
            batch = order[a : a + batch_tokens]
            scores = head(x[batch], head.latent_side(g), rate)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, truth[batch].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            if progress is not None:
                progress.update(len(batch))
        losses.append(total / len(x))
    return head.eval(), losses


@torch.no_grad()
def text_scores(
    head: BilinearHead, token_vectors: np.ndarray, latent_side: torch.Tensor, log_rate
) -> np.ndarray:
    """[n_tokens, L] first-stage scores of one text's token vectors against a dictionary's `latent_side`."""
    rate = torch.as_tensor(np.asarray(log_rate), dtype=torch.float32)
    return head(torch.from_numpy(token_vectors).float(), latent_side, rate).numpy()


@dataclass
class FirstStage:
    """A trained first stage ready to score texts against one dictionary: the head, its record, the encoder
    (the simulator's model), the dictionary's projected interpretation vectors and log firing rates."""

    head: BilinearHead
    record: dict
    encoder: Encoder
    latent_side: torch.Tensor
    log_rate: np.ndarray

    @classmethod
    def load(
        cls,
        folder,
        encoder: Encoder,
        sim,
        interpretations: list[str],
        statistics: dict,
        latents: list[int],
        dtype,
    ) -> FirstStage:
        """The head in `folder` for `sim` (refused for another simulator's weights), the dictionary's vectors
        read from folder/interpretation_vectors/ when this model computed them, else computed once there."""
        head, record = load_head(folder)
        identity = require_trained_for(record, sim, dtype, folder)
        encoder.layer = identity["layer"]
        vectors, _ = interpretation_vectors(
            encoder, interpretations, Path(folder) / "interpretation_vectors", identity
        )
        with torch.no_grad():
            side = head.latent_side(torch.from_numpy(vectors))
        return cls(head, record, encoder, side, log_firing_rate(statistics, latents))

    def scores(self, texts: list[tuple[str, list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (scores [n_tokens, L], aligned [n_tokens]), one pass over the text."""
        return [
            (text_scores(self.head, vectors, self.latent_side, self.log_rate), aligned)
            for vectors, aligned in self.encoder.token_vectors(texts)
        ]


def two_stage_p_yes(
    scorer, stage: FirstStage, interpretations: list[str], texts, k: int, progress=None, per_text=False
):
    """(per text P(yes) [n_tokens, L]: the dense judge's where the first stage proposed the pair (`propose`:
    top-k per token, or the top-k latents of the text at every token), 0 where it did not (not flagged), NaN
    where unaligned; the timing and counts of both stages)."""
    start = time.perf_counter()
    scored = stage.scores(texts)
    proposed = [propose(s, aligned, k, per_text) for s, aligned in scored]  # [n_tokens, L]
    first_seconds = time.perf_counter() - start
    before = dict(scorer.stats)
    logits = scorer.text_logits(interpretations, texts, progress, proposed=[p.T for p in proposed])
    from latentsim.whole_layer import p_yes_of

    out = []
    for lg, prop, (_, aligned) in zip(logits, proposed, scored, strict=True):
        judged = p_yes_of(lg)
        out.append(np.where(prop, judged, np.where(aligned[:, None], 0.0, np.nan)).astype(np.float32))
    seconds = time.perf_counter() - start
    aligned_tokens = sum(int(a.sum()) for _, a in scored)
    ids = sum(len(dense_text_ids(scorer.tokenizer, text, ends)[0]) for text, ends in texts)
    return out, {
        "k": k,
        "seconds": seconds,
        "first_stage_seconds": first_seconds,
        "judge_seconds": seconds - first_seconds,
        "judgments": scorer.stats["judgments"] - before["judgments"],
        "all_judgments": len(interpretations) * aligned_tokens,
        "computed_tokens": scorer.stats["computed_tokens"] - before["computed_tokens"],
        "all_computed_tokens": len(interpretations) * ids,
    }


def proposal_recall(
    first: dict[int, np.ndarray], wanted: dict[str, dict[int, np.ndarray]], ks, held_out: np.ndarray
) -> dict:
    """Recall at each k of the first stage's top-k per token ({row: its P(yes) [n_tokens, L]}, NaN where
    unaligned) of each set of `wanted` pairs ({name: {row: [n_tokens, L] bool}}), over every latent and over
    `held_out` [L] latents only."""
    out = {}
    for name, by_row in wanted.items():
        ranks, ranks_held_out = [], []
        for r, p in first.items():
            aligned = np.isfinite(p).all(axis=1)
            truth = by_row[r][aligned]
            ranks.append(ranks_of_positives(p[aligned], truth))
            ranks_held_out.append(ranks_of_positives(p[aligned], truth & held_out))
        ranks, ranks_held_out = np.concatenate(ranks), np.concatenate(ranks_held_out)
        out[name] = {
            "pairs": int(len(ranks)),
            "recall": recall_at(ranks, ks),
            "held_out_pairs": int(len(ranks_held_out)),
            "recall_held_out_latents": recall_at(ranks_held_out, ks),
        }
    return out


def propose(scores: np.ndarray, aligned: np.ndarray, k: int, per_text: bool = False) -> np.ndarray:
    """[n_tokens, L] bool, the pairs the dense judge is asked about: the top-k latents at each aligned token,
    or (`per_text`) the k latents scoring highest anywhere in the text, each at every aligned token (k passes
    of the judge over the text, whatever the number of tokens)."""
    if not per_text:
        return top_k(scores, k, aligned)
    if not aligned.any():
        return np.zeros(scores.shape, dtype=bool)
    chosen = top_k(scores[aligned].max(axis=0, keepdims=True), k)[0]
    return aligned[:, None] & chosen


def proposals_of(first_p: np.ndarray, k: int, per_text: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(proposed [n_tokens, L], aligned [n_tokens]) of one text's first-stage P(yes) (NaN where unaligned):
    `propose` (P is monotone in the score, so the same ranking)."""
    aligned = np.isfinite(first_p).all(axis=1)
    return propose(np.nan_to_num(first_p, nan=-1.0), aligned, k, per_text), aligned


def derived_two_stage(
    first: dict[int, np.ndarray], judge: dict[int, np.ndarray], k: int, per_text: bool = False
) -> dict:
    """{row: P(yes)} of the two-stage whole layer at `k` (proposals_of) without judging again: the full
    judge's verdict (`judge`: {row: P(yes) of every pair}) where the first stage (`first`: {row: its P(yes)})
    proposes the pair, 0 (not flagged) where it does not, NaN where unaligned. A proposed pair's verdict
    judged alone is the same (DenseScorer.text_logits with `proposed`: causal, the text cut after the last
    proposal)."""
    out = {}
    for r, p in first.items():
        proposed, aligned = proposals_of(p, k, per_text)
        unproposed = np.where(aligned[:, None], 0.0, np.nan)
        out[r] = np.where(proposed, judge[r], unproposed).astype(np.float32)
    return out


def derivation_check(derived: dict[int, np.ndarray], scores: dict[str, dict]) -> dict:
    """How far the derived two-stage P(yes) at the real run's k is from the real run's (scores[TWO_STAGE]):
    the largest difference and the pairs differing by more than 1e-3 (ties in saturated first-stage P can
    swap a proposal)."""
    real = scores[TWO_STAGE]
    diffs = np.concatenate([np.abs(derived[r] - real[r])[np.isfinite(real[r])] for r in real])
    return {
        "max_abs_difference": float(diffs.max()) if len(diffs) else 0.0,
        "pairs_differing_over_1e-3": int((diffs > 1e-3).sum()),
        "pairs": int(len(diffs)),
    }


def proposal_counts(
    first: dict[int, np.ndarray], k: int, truth: dict[int, np.ndarray], held_out: np.ndarray, per_text=False
) -> dict:
    """At `k` (proposals_of): dense judgments against judging every latent, the latents proposed somewhere
    in a text (each costs one pass over its header and the text up to its last proposal), mean per text,
    and the share of the truly active pairs (`truth`: {row: [n_tokens, L] bool}) proposed, over every latent
    and over `held_out` [L] latents."""
    judged, every, latents, hit, active, hit_held, active_held = 0, 0, [], 0, 0, 0, 0
    for r, p in first.items():
        proposed, aligned = proposals_of(p, k, per_text)
        judged, every = judged + int(proposed.sum()), every + int(aligned.sum()) * p.shape[1]
        latents.append(int(proposed.any(axis=0).sum()))
        true = truth[r] & aligned[:, None]
        hit, active = hit + int((proposed & true).sum()), active + int(true.sum())
        hit_held += int((proposed & true & held_out).sum())
        active_held += int((true & held_out).sum())
    return {
        "dense_judgments": judged,
        "all_dense_judgments": every,
        "proposed_latents_per_text": float(np.mean(latents)),
        "dictionary": int(next(iter(first.values())).shape[1]),
        "recall_truly_active": hit / max(active, 1),
        "recall_truly_active_held_out_latents": hit_held / max(active_held, 1),
    }


def proposal_name(k: int, per_text: bool) -> str:
    return f"the {k} latents of highest P in each text" if per_text else f"top-{k} per token"


def judge_whole_layer(
    scorer, sim, args, eval_set, explained: list[int], rows: list[int], subject_tok, shard_dir, judge: dict
):
    """The whole layer's two extra deciders (eval/whole_layer.py with `first_stage`): {FIRST_STAGE: {row: its
    P(yes) [n_tokens, explained]}, TWO_STAGE: {row: two_stage_p_yes}}, each saved per row under
    shard_dir/<decider>/ and read back (latentsim.whole_layer.scored_rows), and what results.json records
    about them: k, timing and judgment counts per run, and the first stage's recall at k = 8, 32, 128 and its
    own k of the truly active latents (the cache's) and of those the simulator (`judge`: {row: P(yes)})
    flags at P >= 0.5, on every judged row."""
    from latentsim.whole_layer import scored_rows, text_of_row, timings

    interpretations = eval_set.interpretations()
    listed = [interpretations[i] for i in explained]
    encoder = Encoder(scorer.model, scorer.tokenizer, sim.prompt_format, batch_size=args.batch_size)
    stage = FirstStage.load(
        args.first_stage, encoder, sim, listed, eval_set.statistics, explained, args.dtype
    )
    k, by_text = args.first_stage_k or stage.record["k"], args.first_stage_per_text

    def text(r):
        return text_of_row(eval_set.tokens, r, args.tokens, subject_tok)[1:]

    def first(todo):
        start = time.perf_counter()
        scored = stage.scores([text(r) for r in todo])
        p = [np.where(a[:, None], sigmoid(s), np.nan).astype(np.float32) for s, a in scored]
        seconds = time.perf_counter() - start
        n = sum(int(a.sum()) for _, a in scored) * len(explained)
        return p, {"rows": todo, "seconds": seconds, "judgments": n, "judgments_per_s": n / seconds}

    def two(todo):
        from tqdm.auto import tqdm

        with tqdm(desc=f"two-stage judging {len(todo)} texts (k = {k})", unit="judgment") as bar:
            p, timing = two_stage_p_yes(scorer, stage, listed, [text(r) for r in todo], k, bar, by_text)
        return p, {"rows": todo, **timing}

    scores = {FIRST_STAGE: scored_rows(shard_dir / FIRST_STAGE, rows, first)}
    scores[TWO_STAGE] = scored_rows(shard_dir / TWO_STAGE, rows, two)
    about = {
        FIRST_STAGE: {
            "model": str(args.first_stage),
            "record": {x: stage.record[x] for x in ("k", "validation")},
        },
        TWO_STAGE: {
            "model": f"{proposal_name(k, by_text)} of {args.first_stage}, judged by the simulator",
            "k": k,
            "per_text": by_text,
        },
    }
    for name in scores:
        about[name]["timing"] = timings(shard_dir / name, rows)
    pairs = active_pairs(eval_set.cache, rows, explained, args.tokens)
    truth = {r: dense_truth(pairs[r], args.tokens, len(explained)) for r in rows}
    trained_latents = training_rows_and_latents(sim)[1]
    held_out = np.array([latent not in trained_latents for latent in explained])
    about[TWO_STAGE] |= proposal_counts(scores[FIRST_STAGE], k, truth, held_out, by_text)
    # Rows derived from the full judge's verdicts, checked against the real two-stage run at k.
    derived = derived_two_stage(scores[FIRST_STAGE], judge, k, by_text)
    about[TWO_STAGE]["derived_check"] = derivation_check(derived, scores)
    # More k from the full judge's verdicts: top-k per token, and the top-m latents per text at every token.
    more = [(x, False) for x in args.first_stage_ks] + [(x, True) for x in args.first_stage_latents_per_text]
    for other, per_text in more:
        name = f"{TWO_STAGE}_{'per_text' if per_text else 'k'}{other}"
        scores[name] = derived_two_stage(scores[FIRST_STAGE], judge, other, per_text)
        about[name] = {
            "model": f"{proposal_name(other, per_text)} of {args.first_stage}, the full judge's verdicts",
            "k": other,
            "per_text": per_text,
            **proposal_counts(scores[FIRST_STAGE], other, truth, held_out, per_text),
        }
    about[FIRST_STAGE]["recall"] = proposal_recall(
        scores[FIRST_STAGE],
        {
            "truly_active": truth,
            "flagged_by_simulator@0.5": {r: np.nan_to_num(judge[r], nan=-1.0) >= 0.5 for r in rows},
        },
        sorted({*RECALL_KS, k, *args.first_stage_ks}),
        held_out,
    )
    return scores, about
