"""Simulator examples: labels checked against the cache, leak-free splits, mixtures, frequency-matched
negatives, determinism, errors."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import FakeHubApi, build_char_tokenizer, load_script, make_cache

from latentsim.cache_reader import CacheReader, load_cache
from latentsim.config import ConfigError, DatasetArguments, ExplainArguments, parse_config
from latentsim.dataset import BuildReport, FrequencyBins, activation_bin, quantile_bin
from latentsim.explain import write_explanation
from latentsim.interpretation_scores import load_scores
from latentsim.latent_stats import load_statistics
from latentsim.metrics import roc_auc

HOOK = "layers.1"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A tiny cache (3 delphi splits: latent ids need the split start added back) and two interpretation
    sets."""
    root = tmp_path_factory.mktemp("ds")
    make_cache(root / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=60, ctx_len=20)
    explain = load_script("data_gen/explain.py")
    for sampling in ("top", "quantiles"):
        explain.main(
            ExplainArguments(
                cache_dir=str(root / "cache"),
                hookpoint=HOOK,
                explanations_dir=str(root / "expl"),
                sampling=sampling,
                window=8,
                min_activations=2,
            )
        )
    return root


def build(root, tiny_model_dir, name, **kwargs):
    args = DatasetArguments(
        **{
            "cache_dir": str(root / "cache"),
            "hookpoint": HOOK,
            "interpretations": [str(root / "expl" / "token_list-quantiles")],
            "simulator_tokenizer": str(tiny_model_dir),
            "output_dir": str(root / name),
            "window_min": 4,
            "window_max": 8,
            "contexts_per_row": 2,
            "seed": 22,
            **kwargs,
        }
    )
    load_script("data_gen/build_dataset.py").main(args)
    return {
        s: pq.read_table(root / name / f"{s}.parquet").to_pylist() for s in ("train", "validation", "test")
    }


def test_labels_match_the_cache(built, tiny_model_dir):
    data = build(built, tiny_model_dir, "labels", negatives_per_positive=2.0)
    cache = load_cache(built / "cache" / "latents", HOOK)
    truth = {
        (int(r), int(p), int(lat)): float(a)
        for (r, p, lat), a in zip(cache.locations.tolist(), cache.activations.tolist(), strict=True)
    }
    stats = load_statistics(built / "cache" / "stats", HOOK)
    rows = [r for split in data.values() for r in split]
    assert len(rows) > 100
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), size=60, replace=False):
        r = rows[i]
        key = (r["row"], r["position"], r["latent"])
        assert r["active"] == int(key in truth), key
        assert r["activation"] == pytest.approx(truth.get(key, 0.0))
        assert r["context_ids"] == cache.tokens[r["row"], r["window_start"] : r["position"] + 1].tolist()
        assert r["window_start"] >= 1 and 4 <= len(r["context_ids"]) <= 8  # position 0 is never in a context
        assert r["completion"][0]["content"] == ("Yes" if r["active"] else "No")
        if r["active"]:
            assert r["activation_bin"] == activation_bin(
                r["activation"], float(stats["max_activation"][r["latent"]])
            )
            assert r["quantile_bin"] == quantile_bin(
                r["activation"], stats["quantile_edges"][r["latent"]].numpy()
            )
    # Latents of the later delphi splits appear with their global ids (the seed's offset bug would lose them).
    assert max(r["latent"] for r in rows if r["active"]) > 42


def test_splits_do_not_leak(built, tiny_model_dir):
    data = build(built, tiny_model_dir, "splits")
    latents = {s: {r["latent"] for r in rows} for s, rows in data.items()}
    row_ids = {s: {r["row"] for r in rows} for s, rows in data.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not latents[a] & latents[b] and not row_ids[a] & row_ids[b]
    contexts = build(built, tiny_model_dir, "ctx_split", split_mode="contexts")
    rows_c = {s: {r["row"] for r in rows} for s, rows in contexts.items()}
    assert not rows_c["train"] & rows_c["test"]
    assert {r["latent"] for r in contexts["train"]} & {r["latent"] for r in contexts["test"]}


def test_interpretations_never_come_from_eval_rows(built, tiny_model_dir, tmp_path):
    """explain.py reads the cache's training rows only; build_dataset refuses a set made from eval rows."""
    split = CacheReader(built / "cache" / "latents", HOOK).row_split()
    record = json.loads((built / "expl" / "token_list-quantiles" / "source_rows.json").read_text())
    assert record["rows"] == "train" and record["row_ids"] == split["train"].tolist()
    assert record["row_split"]["grouping"] == "documents"
    data = build(built, tiny_model_dir, "rows_ok")
    assert {r["row"] for r in data["test"]} <= set(split["test"].tolist())
    stats = json.loads((built / "rows_ok" / "dataset_stats.json").read_text())
    assert "none of them validation, test or confirmation rows" in next(
        iter(stats["interpretation_rows"].values())
    )
    assert stats["row_split"]["splits"]["test"]["rows"] == len(split["test"])
    # The dataset's seed draws its latents, not its rows: the rows stay the cache's.
    other_seed = build(built, tiny_model_dir, "rows_other_seed", seed=5)
    assert all({r["row"] for r in other_seed[s]} <= set(split[s].tolist()) for s in other_seed)
    explain = load_script("data_gen/explain.py")
    explain.main(
        ExplainArguments(
            cache_dir=str(built / "cache"),
            hookpoint=HOOK,
            explanations_dir=str(tmp_path),
            window=8,
            min_activations=2,
            rows="all",
        )
    )
    with pytest.raises(ValueError, match="can quote eval contexts"):
        build(built, tiny_model_dir, "rows_all", interpretations=[str(tmp_path / "token_list-quantiles")])
    (tmp_path / "token_list-quantiles" / "source_rows.json").unlink()  # as an older explain.py left it
    with pytest.raises(ValueError, match="older data_gen/explain.py"):
        build(built, tiny_model_dir, "rows_old", interpretations=[str(tmp_path / "token_list-quantiles")])
    external = tmp_path / "external.json"  # the seed's {latent: text}: made elsewhere, nothing to check
    external.write_text(json.dumps({str(lat): "the token x" for lat in range(64)}))
    build(built, tiny_model_dir, "rows_external", interpretations=[str(external)])
    stats = json.loads((built / "rows_external" / "dataset_stats.json").read_text())
    assert stats["interpretation_rows"] == {str(external): "not recorded (external set)"}


def test_every_stage_reads_the_caches_row_split(built, tiny_model_dir, tmp_path):
    """One source of truth: explain.py, score.py and build_dataset.py read the cache's row_split.json; none
    recomputes it (a changed file changes what they read)."""
    import shutil

    from latentsim.config import ScoreArguments
    from latentsim.explain import example_rows

    reader = CacheReader(built / "cache" / "latents", HOOK)
    split = reader.row_split()
    score_args = ScoreArguments(cache_dir=str(built / "cache"), hookpoint=HOOK)
    assert np.array_equal(example_rows(score_args, reader), split["train"])
    shutil.copytree(built / "cache", tmp_path / "cache")
    path = tmp_path / "cache" / "latents" / HOOK / "row_split.json"
    record = json.loads(path.read_text())
    half = len(split["validation"]) // 2
    record["row_ids"] = {
        "train": sorted(split["train"].tolist() + split["test"].tolist()),
        "validation": split["validation"][half:].tolist(),
        "test": split["validation"][:half].tolist(),
        "confirmation": [],
    }
    path.write_text(json.dumps(record))
    moved = CacheReader(tmp_path / "cache" / "latents", HOOK)
    assert example_rows(score_args, moved).tolist() == record["row_ids"]["train"]
    data = build(built, tiny_model_dir, "moved_rows", cache_dir=str(tmp_path / "cache"))
    assert {r["row"] for r in data["test"]} <= set(split["validation"][:half].tolist())
    assert {r["row"] for r in data["train"]} & set(split["test"].tolist())


def token_lists(names: dict[int, str]) -> dict[str, str]:
    """External token-list interpretations {latent: text} of the 64 latents (`names` instead of w<latent>)."""
    return {str(lat): f'the token "{names.get(lat, f"w{lat}")}", as in "...a cat"' for lat in range(64)}


def test_latent_twins_are_kept_on_one_side(built, tiny_model_dir, tiny_sae_dir, tmp_path):
    """Latents 5 and 40 get decoders at cosine 0.95, latents 9 and 33 the same token list ("cat"): in every
    latent split they share a side, and dataset_stats.json and the card count them."""
    import shutil

    from safetensors.torch import load_file as load_tensors
    from safetensors.torch import save_file as save_tensors

    from latentsim.dataset import dataset_pools
    from latentsim.explain import load_interpretations

    shutil.copytree(tiny_sae_dir, tmp_path / "sae")
    weights = load_tensors(str(tmp_path / "sae" / "sae_weights.safetensors"))
    w = weights["W_dec"]
    other = torch.nn.functional.normalize(w[41] - (w[41] @ w[5]) / (w[5] @ w[5]) * w[5], dim=0)
    w[40] = (0.95 * w[5] / w[5].norm() + (1 - 0.95**2) ** 0.5 * other) * w[40].norm()
    save_tensors(weights, str(tmp_path / "sae" / "sae_weights.safetensors"))
    shutil.copytree(built / "cache", tmp_path / "cache")
    config_path = tmp_path / "cache" / "latents" / HOOK / "config.json"
    config = json.loads(config_path.read_text())
    config["latentsim"]["sae"]["sae_path"] = str(tmp_path / "sae")
    config_path.write_text(json.dumps(config))
    (tmp_path / "twins.json").write_text(json.dumps(token_lists({9: "cat", 33: "cat"})))

    args = DatasetArguments(
        cache_dir=str(tmp_path / "cache"),
        hookpoint=HOOK,
        interpretations=[str(tmp_path / "twins.json")],
        validation_fraction=0.2,
        test_fraction=0.2,
        output_dir=str(tmp_path / "twins"),
    )
    reader = CacheReader(tmp_path / "cache" / "latents", HOOK)
    interpretations = [load_interpretations(tmp_path / "twins.json", HOOK, 64)]
    explained = np.arange(64)
    for seed in range(12):
        pools = dataset_pools(explained, reader, interpretations, args, np.random.default_rng(seed))[0]
        side = {int(lat): s for s, latents in pools.items() for lat in latents}
        assert side[5] == side[40] and side[9] == side[33], seed
    build(
        built,
        tiny_model_dir,
        "twins",
        cache_dir=str(tmp_path / "cache"),
        interpretations=args.interpretations,
    )
    stats = json.loads((built / "twins" / "dataset_stats.json").read_text())
    assert stats["latent_twins"] == {
        "decoder_cosine": 0.9,
        "decoder_pairs": 1,
        "token_head_pairs": 1,
        "groups": 2,
        "latents_in_groups": 4,
        "largest_group": 2,
    }
    assert (
        "1 decoder pairs, 1 token-head pairs, 2 groups of 4 latents"
        in (built / "twins" / "README.md").read_text()
    )


def test_confirmation_split_is_locked(built, tiny_model_dir, tmp_path):
    """A cache with confirmation rows: every dataset built on it needs a confirmation share, writes
    confirmation.parquet (its latents x the confirmation rows), and no other split holds any of them; a
    simulator trained on a confirmation latent is refused there even with allow_seen_latents."""
    import shutil
    from types import SimpleNamespace

    import pandas as pd

    from latentsim.errors import BadInputError
    from latentsim.eval_set import EvalSet
    from latentsim.held_out import refuse_seen
    from latentsim.splits import ensure_row_split

    shutil.copytree(built / "cache", tmp_path / "cache")
    reader = CacheReader(tmp_path / "cache" / "latents", HOOK)
    ensure_row_split(reader, {"validation": 0.1, "test": 0.1, "confirmation": 0.15}, 5, 2)
    rows = reader.row_split()
    assert 0 < len(rows["confirmation"]) <= round(60 * 0.15)
    (tmp_path / "lists.json").write_text(json.dumps(token_lists({})))
    common = dict(cache_dir=str(tmp_path / "cache"), interpretations=[str(tmp_path / "lists.json")])
    with pytest.raises(ConfigError, match="`confirmation_fraction`: the cache keeps .* confirmation rows"):
        build(built, tiny_model_dir, "no_share", **common)
    with pytest.raises(ConfigError, match="`confirmation_fraction`: the cache keeps no confirmation rows"):
        build(
            built,
            tiny_model_dir,
            "no_rows",
            interpretations=common["interpretations"],
            confirmation_fraction=0.1,
        )

    build(built, tiny_model_dir, "locked", **common, confirmation_fraction=0.15)
    folder = built / "locked"
    frames = {
        s: pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation", "test", "confirmation")
    }
    locked = frames.pop("confirmation")
    assert len(locked) and set(locked["row"]) <= set(rows["confirmation"].tolist())
    for split, df in frames.items():
        assert not set(df["latent"]) & set(locked["latent"]), split
        assert not set(df["row"]) & set(locked["row"]), split
    stats = json.loads((folder / "dataset_stats.json").read_text())
    assert list(stats["splits"]) == ["train", "validation", "test", "confirmation"]
    assert stats["splits"]["confirmation"]["latent_pool"] == round(64 * 0.15)
    assert "path: confirmation.parquet" in (folder / "README.md").read_text()
    assert len(EvalSet.open(folder).split("confirmation")) == len(locked)
    contexts = build(
        built, tiny_model_dir, "locked_contexts", **common, confirmation_fraction=0.15, split_mode="contexts"
    )
    assert {r["latent"] for r in contexts["train"]} & {r["latent"] for r in contexts["test"]}
    assert not {r["latent"] for r in contexts["train"]} & set(locked["latent"])

    # held_out: a simulator trained on this dataset meets no confirmation row or latent; one that met a
    # confirmation latent is refused there, even where training latents are allowed elsewhere.
    sim = SimpleNamespace(name="sim", train_datasets=[str(folder)])
    eval_set = SimpleNamespace(cache_dir=str(tmp_path / "cache"), hookpoint=HOOK)
    refuse_seen(sim, eval_set, {"confirmation": locked}, allow_seen_latents=False)
    seen = locked.assign(latent=int(frames["train"]["latent"].iloc[0]))
    refuse_seen(sim, eval_set, {"test": seen}, allow_seen_latents=True)
    with pytest.raises(
        BadInputError, match="trained on 1 latents of the eval set's confirmation split.*allows none"
    ):
        refuse_seen(sim, eval_set, {"confirmation": seen}, allow_seen_latents=True)


def test_positive_selection_and_negative_ratio(built, tiny_model_dir):
    top = build(built, tiny_model_dir, "top1", positives="top_k", top_k=1, negatives_per_positive=3.0)[
        "train"
    ]
    per_context = Counter((r["row"], r["position"]) for r in top if r["active"])
    assert max(per_context.values()) == 1
    kinds = Counter(r["candidate"] for r in top)
    assert kinds["random_negative"] == pytest.approx(3 * kinds["positive"], rel=0.2)
    hard = build(built, tiny_model_dir, "hard", hard_negatives="same_token", hard_negative_fraction=1.0)[
        "train"
    ]
    assert any(r["candidate"] == "hard_negative" for r in hard)
    assert all(r["active"] == 0 for r in hard if r["candidate"] != "positive")


def test_mixture_weights(built, tiny_model_dir):
    sets = [str(built / "expl" / "token_list-quantiles"), str(built / "expl" / "token_list-top")]
    data = build(
        built,
        tiny_model_dir,
        "mix",
        interpretations=sets,
        interpretation_weights=[0.8, 0.2],
        contexts_per_row=6,
    )
    counts = Counter(r["interpretation_source"] for r in data["train"])
    share = counts[sets[0]] / sum(counts.values())
    assert 0.72 < share < 0.88, counts


def test_value_labels(built, tiny_model_dir):
    data = build(
        built,
        tiny_model_dir,
        "value",
        prompt_format="sim_value_v1",
        label="quantile_bin",
        negatives_per_positive=0.0,
    )
    rows = data["train"]
    assert rows and all(r["active"] == 1 for r in rows)
    assert all(r["completion"][0]["content"] == str(r["quantile_bin"]) for r in rows)
    assert len({r["quantile_bin"] for r in rows}) > 3


def test_same_config_gives_identical_bytes(built, tiny_model_dir):
    build(built, tiny_model_dir, "det_a")
    build(built, tiny_model_dir, "det_b")
    for split in ("train", "validation", "test"):
        assert (built / "det_a" / f"{split}.parquet").read_bytes() == (
            built / "det_b" / f"{split}.parquet"
        ).read_bytes()
    stats = json.loads((built / "det_a" / "dataset_stats.json").read_text())
    assert stats["latents_without_interpretation"] > 0  # counted and reported
    assert "prompt format: `sim_v1`" in (built / "det_a" / "README.md").read_text()


def test_judged_token_stays_marked_for_another_tokenizer(built, tiny_model_dir):
    """The simulator may split the text differently from the subject: the marker keeps the judged token
    clear."""
    rows = build(built, tiny_model_dir, "tok")["train"]
    from transformers import AutoTokenizer

    subject = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    simulator = build_char_tokenizer()
    for r in rows[:30]:
        text = r["prompt"][0]["content"]
        context = text.split("Text: ", 1)[1].split("\n\nInterpretation: ")[0]
        judged = subject.decode(r["context_ids"][-1:])
        assert context == subject.decode(r["context_ids"][:-1]) + f"<<{judged}>>"
        assert context.count("<<") == 1 and context.endswith(">>")
        pieces = simulator.convert_ids_to_tokens(simulator(context, add_special_tokens=False)["input_ids"])
        assert len(pieces) > len(r["context_ids"])  # a genuinely different segmentation...
        assert "".join(pieces).endswith(f"<<{judged}>>".replace(" ", ""))  # ...with the marked token intact


def prior_scores(rows: list[dict], firing_rate: np.ndarray) -> tuple[float, float]:
    """(KS statistic between the positives' and negatives' log firing rates, per-context median AUC of ranking
    the candidates by firing rate alone): how far the frequency prior gets on a split."""
    from scipy.stats import ks_2samp

    log_rate = np.log(np.maximum(firing_rate[[r["latent"] for r in rows]], 1e-7))
    active = np.array([r["active"] for r in rows])
    ks = ks_2samp(log_rate[active == 1], log_rate[active == 0]).statistic
    contexts: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        contexts.setdefault((r["row"], r["position"]), []).append(r)
    aucs = [
        roc_auc(firing_rate[[r["latent"] for r in c]], np.array([r["active"] for r in c]))
        for c in contexts.values()
    ]
    return float(ks), float(np.nanmedian(aucs))


def test_frequency_matched_negatives_defeat_the_firing_rate_prior(built, tiny_model_dir):
    firing_rate = load_statistics(built / "cache" / "stats", HOOK)["firing_rate"].numpy()
    uniform = build(built, tiny_model_dir, "prior_uniform", negatives_per_positive=2.0)
    matched = build(
        built,
        tiny_model_dir,
        "prior_matched",
        negatives_per_positive=2.0,
        negative_sampling="frequency_matched",
    )
    ks_uniform, auc_uniform = prior_scores(uniform["train"], firing_rate)
    ks_matched, auc_matched = prior_scores(matched["train"], firing_rate)
    # Measured on this cache: KS 0.30 -> 0.07, prior AUC 0.72 -> 0.53.
    assert ks_uniform > 0.2 and ks_matched < 0.1 and ks_matched < ks_uniform / 3, (ks_uniform, ks_matched)
    assert auc_uniform > 0.65 and abs(auc_matched - 0.5) < 0.05, (auc_uniform, auc_matched)
    # Still the right labels: every negative is inactive at its token, every positive active with its value.
    cache = load_cache(built / "cache" / "latents", HOOK)
    truth = {
        (int(r), int(p), int(lat)): float(a)
        for (r, p, lat), a in zip(cache.locations.tolist(), cache.activations.tolist(), strict=True)
    }
    rows = [r for split in matched.values() for r in split]
    per_context = Counter((r["row"], r["position"], r["candidate"]) for r in rows)
    for row, position, kind in per_context:
        if kind == "random_negative":  # as many as uniform gives: 2 per positive (2 without any)
            assert per_context[row, position, kind] == 2 * max(per_context[row, position, "positive"], 1)
    for r in rows:
        key = (r["row"], r["position"], r["latent"])
        assert r["active"] == int(key in truth) == int(r["candidate"] == "positive"), key
        assert r["activation"] == pytest.approx(truth.get(key, 0.0))
    stats = json.loads((built / "prior_matched" / "dataset_stats.json").read_text())
    assert stats["negative_sampling"] == "frequency_matched" and stats["frequency_bins"] == 10
    assert stats["negatives_off_bin"] > 0 and stats["negatives_short"] == 0  # the fallback ran, and sufficed
    assert "negative sampling: `frequency_matched`" in (built / "prior_matched" / "README.md").read_text()
    uniform_stats = json.loads((built / "prior_uniform" / "dataset_stats.json").read_text())
    assert "negative_sampling" not in uniform_stats  # uniform files stay as they were before the key existed
    assert "negative sampling" not in (built / "prior_uniform" / "README.md").read_text()
    build(
        built,
        tiny_model_dir,
        "prior_matched_again",
        negatives_per_positive=2.0,
        negative_sampling="frequency_matched",
    )
    for split in ("train", "validation", "test"):
        assert (built / "prior_matched" / f"{split}.parquet").read_bytes() == (
            built / "prior_matched_again" / f"{split}.parquet"
        ).read_bytes()


def test_frequency_bins_draw_from_the_positives_bins_then_the_nearest():
    firing_rate = np.logspace(-5, -1, 100)  # latent i in bin i // 10
    bins = FrequencyBins.build(np.arange(100), firing_rate, 10)
    assert [m.tolist() for m in bins.members] == [list(range(10 * b, 10 * b + 10)) for b in range(10)]
    report = BuildReport()
    taken = {95, 96, 97}  # active at the token (two of them the positives)
    picked = bins.draw([95, 96], 5, taken, np.random.default_rng(0), report)
    assert (
        len(set(picked)) == 5
        and set(picked) <= {90, 91, 92, 93, 94, 98, 99}
        and report.negatives_off_bin == 0
    )
    picked = bins.draw([95, 96], 10, taken, np.random.default_rng(0), report)
    assert sorted(p for p in picked if p >= 90) == [90, 91, 92, 93, 94, 98, 99]
    assert len([p for p in picked if 80 <= p < 90]) == 3 and report.negatives_off_bin == 3  # bin 9 ran out
    assert picked == bins.draw([95, 96], 10, taken, np.random.default_rng(0), BuildReport())  # seeded
    # No positives: bins weighted by summed firing rate (a random token's active latents), the frequent ones.
    picked = bins.draw([], 200, set(), np.random.default_rng(1), BuildReport())
    assert len(picked) == 100 and bins.random_token_shares.argmax() == 9
    assert bins.draw([], 0, set(), np.random.default_rng(1), report) == []


def test_bins():
    assert (
        activation_bin(10.0, 10.0) == 9 and activation_bin(0.5, 10.0) == 0 and activation_bin(5.0, 10.0) == 5
    )
    edges = np.linspace(0, 10, 11)
    assert quantile_bin(0.1, edges) == 0 and quantile_bin(9.9, edges) == 9 and quantile_bin(10.0, edges) == 9


def test_clear_errors(built, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`negatives_per_positive`"):
        DatasetArguments(interpretations=["x"], prompt_format="sim_value_v1", label="quantile_bin")
    with pytest.raises(ConfigError, match="`label`"):
        DatasetArguments(
            interpretations=["x"], prompt_format="sim_v1", label="quantile_bin", negatives_per_positive=0
        )
    with pytest.raises(
        ConfigError, match="`negative_sampling`: 'matched' is not one of uniform, frequency_matched"
    ):
        DatasetArguments(interpretations=["x"], negative_sampling="matched")
    with pytest.raises(ConfigError, match="`frequency_bins`: must be >= 1"):
        DatasetArguments(interpretations=["x"], negative_sampling="frequency_matched", frequency_bins=0)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("interpretations: [x]\npositive: top_k\n")
    with pytest.raises(ConfigError, match="`positive` \\(did you mean `positives`"):
        parse_config((DatasetArguments,), ["--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match="data_gen/explain.py"):
        build(built, tiny_model_dir, "missing", interpretations=[str(tmp_path / "nope")])
    wrong = tmp_path / "wrong_sae"
    write_explanation(wrong, HOOK, 500, "a latent this 64-wide SAE does not have")
    with pytest.raises(ValueError, match="wrong SAE"):
        build(built, tiny_model_dir, "wrong", interpretations=[str(wrong)])
    with pytest.raises(FileNotFoundError, match="`score_path`: .* must be a JSON file"):
        build(built, tiny_model_dir, "no_scores", score_path=str(tmp_path / "nope.json"))
    (tmp_path / "wide.json").write_text(json.dumps({"500": 0.9}))
    with pytest.raises(ValueError, match="`score_path`: .* outside the SAE's 64; wrong SAE"):
        build(built, tiny_model_dir, "wide", score_path=str(tmp_path / "wide.json"))
    (tmp_path / "list.json").write_text("[0.5]")
    with pytest.raises(ValueError, match="`score_files`: .* must be a JSON file"):  # the key the caller names
        load_scores(tmp_path / "list.json", HOOK, 64, key="score_files")


def test_push_to_hub_uploads_the_built_folder(built, tiny_model_dir):
    api = FakeHubApi()
    args = DatasetArguments(
        cache_dir=str(built / "cache"),
        hookpoint=HOOK,
        interpretations=[str(built / "expl" / "token_list-quantiles")],
        simulator_tokenizer=str(tiny_model_dir),
        output_dir=str(built / "pushed"),
        window_min=4,
        window_max=8,
        push_to_hub="me/sim",
    )
    load_script("data_gen/build_dataset.py").main(args, api=api)
    (name, repo), (name2, upload) = api.calls
    assert name == "create_repo" and repo == {
        "repo_id": "me/sim",
        "repo_type": "dataset",
        "private": True,
        "exist_ok": True,
    }
    assert name2 == "upload_folder" and upload["folder_path"] == str(built / "pushed")
    assert {p.name for p in (built / "pushed").iterdir()} >= {
        "train.parquet",
        "validation.parquet",
        "test.parquet",
        "README.md",
        "run_config.json",
    }


def test_decoder_hard_negatives_are_decoder_neighbours(built, tiny_model_dir, tiny_sae_dir):
    rows = build(
        built,
        tiny_model_dir,
        "dec",
        hard_negatives="decoder",
        hard_negative_fraction=1.0,
        negatives_per_positive=1.0,
    )["train"]
    from sae_lens import SAE

    from latentsim.dataset import decoder_neighbours
    from latentsim.explain import load_interpretations

    explained = np.array(sorted(load_interpretations(built / "expl" / "token_list-quantiles", HOOK, 64)))
    neighbours = decoder_neighbours(SAE.load_from_disk(str(tiny_sae_dir)).W_dec.detach(), explained)
    by_context = {}
    for r in rows:
        by_context.setdefault((r["row"], r["position"]), []).append(r)
    hard = [r for r in rows if r["candidate"] == "hard_negative"]
    assert hard
    for r in hard:
        positives = [p["latent"] for p in by_context[(r["row"], r["position"])] if p["active"]]
        assert r["active"] == 0
        assert any(r["latent"] in neighbours[p] for p in positives)


def test_decoder_neighbours_chunking_is_exact():
    from latentsim.dataset import decoder_neighbours

    w = torch.randn(50, 8)
    ids = np.arange(3, 50)
    whole = decoder_neighbours(w, ids, k=4, chunk=1000)
    chunked = decoder_neighbours(w, ids, k=4, chunk=7)
    assert all(np.array_equal(whole[i], chunked[i]) for i in ids)
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    best = max((j for j in ids if j != 10), key=lambda j: cos[10, j])
    assert whole[10][0] == best and 10 not in whole[10]
