"""Dense simulators (sim_dense_v1): alignment across tokenizers, labels at the right positions, the dense
dataset, training, and scoring equal to a naive forward."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    build_char_tokenizer,
    build_tiny_tokenizer,
    load_script,
    make_explained_cache,
    run_accelerate,
    sft_args,
)

from latentsim.config import DatasetArguments, EvalArguments
from latentsim.errors import BadInputError, ConfigError
from latentsim.prompts import (
    answer_token_ids,
    dense_token_ids,
    marked_context,
    render_prompt,
    unmark_context,
)
from latentsim.simulators import Judgment, judgments_of
from latentsim.simulators.hf import DenseScorer, naive_dense_logits
from latentsim.training import check_dense_supervision, dense_features

HOOK = "layers.1"
FMT = "sim_dense_v1"


def test_alignment_reads_the_simulator_token_that_ends_with_each_subject_token():
    text = "the cat sat"
    # Subject tokens "the", " cat", " sat" end at characters 3, 7, 11.
    chars = build_char_tokenizer()
    ids, positions = dense_token_ids(chars, FMT, "x", text, [3, 7, 11])
    header = len(chars("Latent: x\nText:", add_special_tokens=True)["input_ids"])
    assert positions == [header + 2, header + 6, header + 10]  # the last character of each word
    assert [chars.convert_ids_to_tokens(ids[p]) for p in positions] == ["e", "t", "t"]
    # Character-level subject tokens read by a word-level simulator: only word ends have a token ending there;
    # a position inside a word would be read mid-way (or with the next characters): refused, never guessed.
    words = build_tiny_tokenizer()
    ids, positions = dense_token_ids(words, FMT, "x", text, list(range(1, 12)))
    head = len(ids) - 3
    assert positions == [-1, -1, head, -1, -1, -1, head + 1, -1, -1, -1, head + 2]


def dense_read(judgment: Judgment) -> tuple[str, str]:
    """(interpretation, text up to and including the judged token): what a dense simulator reads."""
    prefix, judged = unmark_context(judgment.context)
    return judgment.interpretation.strip(), prefix + judged


def test_a_dense_judgment_is_its_context_up_to_the_judged_token():
    tok = build_tiny_tokenizer()
    scorer = DenseScorer(None, tok, [0, 1])
    judgment = Judgment(marked_context("the cat", " sat"), " the word sat ")
    interpretation, ids = scorer.judgment_text_ids(judgment)
    assert (
        interpretation == "the word sat" and ids == tok("the cat sat", add_special_tokens=False)["input_ids"]
    )
    assert unmark_context(marked_context("a <<b>> c", " d")) == ("a <<b>> c", " d")  # the last mark is judged
    with pytest.raises(BadInputError, match="scores"):
        scorer.judgment_text_ids(Judgment(marked_context("a", " b"), "c", 0.5))
    with pytest.raises(ConfigError, match="dense"):
        render_prompt(FMT, "a<<b>>", "c")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A cache, a dense training mixture and a per-judgment eval set sharing its held-out latents."""
    root = tmp_path_factory.mktemp("dense")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    build = load_script("data_gen/build_dataset.py").main
    common = dict(
        cache_dir=str(root / "cache"),
        hookpoint=HOOK,
        simulator_tokenizer=str(tiny_model_dir),
        interpretations=[str(root / "expl" / "token_list-quantiles")],
        window_min=4,
        window_max=6,
        contexts_per_row=2,
        validation_fraction=0.2,
        test_fraction=0.2,
        seed=3,
    )
    build(
        DatasetArguments(
            **common, positives="top_k", top_k=3, prompt_format=FMT, output_dir=str(root / "dense")
        )
    )
    build(DatasetArguments(**common, positives="top_k", top_k=3, output_dir=str(root / "per_judgment")))
    build(
        DatasetArguments(
            **common, positives="all", negatives_per_context=6, output_dir=str(root / "eval_set")
        )
    )
    return root


def test_dense_rows_label_every_window_token_from_the_cache(assets):
    from latentsim.cache_reader import load_cache

    cache = load_cache(assets / "cache" / "latents", HOOK)
    active = {(int(r), int(p), int(lat)) for r, p, lat in cache.locations.tolist()}
    dense = pd.read_parquet(assets / "dense" / "train.parquet")
    judged = pd.read_parquet(assets / "per_judgment" / "train.parquet")
    # The same candidates and judgment prompts as the per-judgment mixture of the same seed.
    assert dense[["latent", "row", "position", "active"]].equals(
        judged[["latent", "row", "position", "active"]]
    )
    assert (
        dense["prompt"].map(lambda m: m[0]["content"]).equals(judged["prompt"].map(lambda m: m[0]["content"]))
    )
    positives = 0
    for r in dense.itertuples():
        start = r.window_start
        expected = [int((r.row, start + i, r.latent) in active) for i in range(r.position - start + 1)]
        assert list(r.token_labels) == expected
        assert r.token_labels[-1] == r.active and r.text.endswith(r.context.split("<<")[-1][:-2])
        assert [r.text[:e] for e in r.token_ends] == [
            " ".join(r.text.split(" ")[: i + 1]) for i in range(len(expected))
        ]
        positives += sum(expected[:-1])
    assert positives > 0  # labels before the judged token carry signal too
    stats = json.loads((assets / "dense" / "dataset_stats.json").read_text())["splits"]["train"]
    assert (
        stats["token_labels"] == sum(len(x) for x in dense["token_labels"]) and stats["tokens_unaligned"] == 0
    )


def test_labels_sit_one_after_the_position_that_reads_them(assets, tiny_model_dir):
    """A planted label: the causal-LM label at p + 1 is the answer for the token ending at p (an off-by-one in
    either direction would put it on a neighbour)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    no, yes = answer_token_ids(FMT, tok)
    row = {
        "interpretation": "the word dog",
        "text": "the cat sat on",
        "token_ends": [3, 7, 11, 14],
        "token_labels": [0, 1, -1, 0],
    }
    split, unaligned = dense_features(Dataset.from_list([row]), tok, FMT, [no, yes], max_length=64)
    ex = split[0]
    assert unaligned == 0
    supervised = {j: label for j, label in enumerate(ex["labels"]) if label != -100}
    cat = ex["input_ids"].index(tok.convert_tokens_to_ids("cat"))
    the = cat - 1
    on = cat + 2
    assert supervised == {the + 1: no, cat + 1: yes, on + 1: no}  # "sat" (-1) stays unlabelled
    assert tok.convert_ids_to_tokens(ex["input_ids"][cat]) == "cat" and ex["label_positions"] == [
        the,
        cat,
        on,
    ]
    check_dense_supervision(split, [no, yes])
    shifted = split.map(lambda e: {"labels": [-100] + e["labels"][:-1]})
    with pytest.raises(BadInputError, match="lines up"):
        check_dense_supervision(shifted, [no, yes])
    with pytest.raises(ConfigError, match="max_length"):
        dense_features(Dataset.from_list([row]), tok, FMT, [no, yes], max_length=4)


def test_dense_scorer_equals_a_naive_forward(assets, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = answer_token_ids(FMT, tok)
    test = pd.read_parquet(assets / "eval_set" / "test.parquet")
    test = test.sort_values(["latent", "row"], kind="stable").head(40).sample(frac=1.0, random_state=0)
    judgments, _ = judgments_of(test)
    scorer = DenseScorer(model, tok, ids, batch_size=7, fmt=FMT)
    fast = scorer.label_logits(judgments)
    naive = np.stack(
        [
            naive_dense_logits(model, tok, FMT, *dense_read(j), [len(dense_read(j)[1])], ids)[-1]
            for j in judgments
        ]
    )
    assert len({len(j.context) for j in judgments}) > 1  # batches hold judgments of different lengths
    assert test["latent"].value_counts().max() > 1  # judgments of one latent share its header's KV
    assert scorer.stats["computed_tokens"] < scorer.stats["prompt_tokens"]
    assert np.abs(fast - naive).max() < 1e-4
    # Every position of one dense forward equals reading each prefix on its own (causal: no look-ahead).
    r = pd.read_parquet(assets / "dense" / "train.parquet").iloc[0]
    full = naive_dense_logits(model, tok, FMT, r.interpretation, r.text, list(r.token_ends), ids)
    each = [
        naive_dense_logits(model, tok, FMT, r.interpretation, r.text[:e], [e], ids)[-1] for e in r.token_ends
    ]
    assert np.abs(full - np.stack(each)).max() < 1e-4


def test_whole_layer_scores_equal_one_forward_per_judgment(tiny_model_dir):
    """text_logits (each header's KV reused across texts, latents batched by header length) equals reading
    each (latent, token) on its own; unaligned tokens stay NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = answer_token_ids(FMT, tok)
    interpretations = ["cat", "red blue", "dog", "one two three four", "the mat", "tree"]
    texts = [
        ("the cat sat on a mat", [3, 7, 11, 14, 16, 20]),
        ("a dog ran far", [1, 5, 8, 13]),
        ("big red house", [3, 5, 6, 13]),
    ]  # characters 5 and 6 end inside "red": no simulator token ends there
    scorer = DenseScorer(model, tok, ids, batch_size=2, fmt=FMT)
    out = scorer.text_logits(interpretations, texts)
    assert [o.shape for o in out] == [(6, 6, 2), (6, 4, 2), (6, 4, 2)]
    for (text, ends), got in zip(texts, out, strict=True):
        for i, interp in enumerate(interpretations):
            expected = naive_dense_logits(model, tok, FMT, interp, text, ends, ids)
            assert np.array_equal(np.isnan(got[i]), np.isnan(expected))
            each = [
                naive_dense_logits(model, tok, FMT, interp, text[:e], [e], ids)[-1]
                if not np.isnan(expected[j, 0])
                else [np.nan, np.nan]
                for j, e in enumerate(ends)
            ]
            assert np.nanmax(np.abs(got[i] - np.array(each))) < 1e-4
    assert np.isnan(out[2][:, 1:3]).all() and not np.isnan(out[2][:, [0, 3]]).any()
    judged = sum(np.isfinite(o[..., 0]).sum() for o in out)
    assert scorer.stats["judgments"] == judged
    # Every header once, every text once per latent: far fewer tokens than one forward per judgment.
    headers = sum(len(tok(f"Latent: {i}\nText:")["input_ids"]) for i in interpretations)
    text_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t, _ in texts)
    assert scorer.stats["computed_tokens"] == headers + len(interpretations) * text_tokens


def test_bench_whole_layer_checks_exactness(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentsim.bench import bench_dense_scoring

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text, ends = "the cat sat on a mat", [3, 7, 11, 14, 16, 20]
    result = bench_dense_scoring(
        model, tok, ["cat", "dog", "mat"], text, ends, [1, 4], batch_size=4, repeats=1, calibration_gflops=1.0
    )
    assert result["exact"] is True and result["max_abs_diff_margin"] < 1e-4
    assert set(result["judgments_per_s"]) == {
        "dense_kv_shared",
        "dense_value_kv_shared",
        "dense_per_position",
        "sim_v1_prefix_shared",
    }
    # The value format reads 11 answer rows in the same pass: exact against one forward per latent.
    assert result["value_exact"] is True and result["ratio_value_vs_binary_dense"] > 0
    per = result["computed_tokens_per_judgment"]
    assert (
        per["dense_value_kv_shared"] == per["dense_kv_shared"]
    )  # same tokens computed: only the rows differ
    per = result["computed_tokens_per_judgment"]
    assert (
        per["dense_kv_shared"] < per["sim_v1_prefix_shared"]
        and per["dense_kv_shared"] < per["dense_per_position"]
    )


def test_dense_training_and_sweep(assets, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    load_script("train/sft.py").main(
        *sft_args(assets / "dense", tiny_model_dir, out, script={"prompt_format": FMT})
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["prompt_format"] == FMT and results["adapter"]["reload_max_abs_diff_p_yes"] < 1e-5
    assert set(results["labels_unaligned"]) == {"train", "validation", "test"}  # word tokens align exactly
    assert not any(results["labels_unaligned"].values()) and "contexts_truncated" not in results
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    curve = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert np.mean(curve[-3:]) < np.mean(curve[:3])
    # A random tiny model gives No and Yes nearly equal logits: its first loss is the two-way CE, ~ln 2.
    assert curve[0] == pytest.approx(np.log(2), abs=0.15)
    # The sweep scores the dense simulator on the per-judgment eval set, with the dense scorer.
    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(assets / "eval_set"),
            run_dirs=[str(out)],
            output_dir=str(tmp_path / "eval"),
            batch_size=4,
            include_checkpoints=False,
        )
    )
    root = tmp_path / "eval" / "eval_set"
    record = json.loads((root / "run__final" / "results.json").read_text())
    assert record["simulator"]["prompt_format"] == FMT
    preds = pd.read_parquet(root / "run__final" / "predictions_test.parquet")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)
    ).eval()
    test = pd.read_parquet(assets / "eval_set" / "test.parquet")
    interp, text = dense_read(judgments_of(test.iloc[:1])[0][0])
    ids = answer_token_ids(FMT, tok)
    expected = naive_dense_logits(model, tok, FMT, interp, text, [len(text)], ids)[-1]
    assert np.allclose(preds.loc[0, ["logit_0", "logit_1"]].to_numpy(dtype=float), expected, atol=1e-4)
    # The whole layer at every position: every explained latent judged at every token of held-out texts.
    import shutil

    from latentsim.config import WholeLayerArguments
    from latentsim.eval_set import EvalSet
    from latentsim.whole_layer import simulator_p_yes, text_of_row

    whole = load_script("eval/whole_layer.py")
    args = dict(
        eval_set=str(assets / "eval_set"),
        simulator=str(out),
        texts=2,
        tokens=8,
        calibration_texts=1,
        batch_size=4,
        output_dir=str(tmp_path / "whole"),
    )
    result = whole.main(WholeLayerArguments(**args))
    eval_set = EvalSet.open(assets / "eval_set")
    interpretations = eval_set.interpretations()
    assert result["explained_latents"] == len(interpretations)
    (timing,) = result["timing"]  # calibration and test texts judged together: each header once
    assert (
        len(timing["rows"]) == 3 and timing["judgments"] == len(interpretations) * 8 * 3
    )  # word-level: all aligned
    assert result["sources"]["sae"]["recovery"] == 1.0 and result["sources"]["no_latents"]["recovery"] == 0.0
    table = pd.read_parquet(tmp_path / "whole" / "per_position.parquet")
    assert len(table) == 2 * 8 * len(result["sources"]) and set(table["row"]) == set(result["rows"])
    assert set(result["rows"]) <= set(pd.read_parquet(assets / "eval_set" / "test.parquet")["row"])
    assert not set(result["rows"]) & set(pd.read_parquet(assets / "dense" / "train.parquet")["row"])
    # Each text's shard holds the simulator's P(yes) for every explained latent at every position.
    saved = np.load(tmp_path / "whole" / "scores" / f"row{result['rows'][0]}.npy")
    first = sorted(interpretations)[0]
    _, text, ends = text_of_row(eval_set.tokens, result["rows"][0], 8, tok)
    (again,) = simulator_p_yes(DenseScorer(model, tok, ids, 4, FMT), [interpretations[first]], [(text, ends)])
    assert saved.shape == (8, len(interpretations)) and np.allclose(saved[:, 0], again[:, 0], atol=1e-5)
    # A rerun of the same config returns the finished results; another config in the same folder is refused.
    assert whole.main(WholeLayerArguments(**args)) == json.loads(
        (tmp_path / "whole" / "results.json").read_text()
    )
    with pytest.raises(ConfigError, match="another config"):
        whole.main(WholeLayerArguments(**{**args, "tokens": 6}))
    # A prompted sim_v1 simulator over the whole dictionary at each text's last position (the seed's setting):
    # one prompt per latent, P(yes) equal to the naive forward of that prompt, only that position patched and
    # measured.
    base = dict(
        args,
        simulator="",
        baseline=f"name=zero-shot,model={tiny_model_dir}",
        positions="last",
        output_dir=str(tmp_path / "whole_v1"),
    )
    result = whole.main(WholeLayerArguments(**base))
    (timing,) = result["timing"]
    assert result["prompt_format"] == "sim_v1" and result["positions"] == "last"
    assert timing["judgments"] == len(interpretations) * 3 and timing["computed_tokens_per_judgment"] > 1
    table = pd.read_parquet(tmp_path / "whole_v1" / "per_position.parquet")
    assert len(table) == 2 * len(result["sources"]) and set(table["position"]) == {8}
    row = result["rows"][0]
    saved = np.load(tmp_path / "whole_v1" / "scores" / f"row{row}.npy")
    assert np.isnan(saved[:7]).all() and np.isfinite(saved[7]).all()
    from latentsim.prompts import marked_context, render_prompt
    from latentsim.simulators.hf import naive_label_logits

    base_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    window = eval_set.cache.tokens[row, 1:9].tolist()
    prompt = render_prompt(
        "sim_v1",
        marked_context(base_tok.decode(window[:-1]), base_tok.decode(window[-1:])),
        interpretations[first],
    )
    naive = naive_label_logits(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(),
        base_tok,
        [prompt],
        answer_token_ids("sim_v1", base_tok),
    )[0]
    assert saved[7, 0] == pytest.approx(1 / (1 + np.exp(naive[0] - naive[1])), abs=1e-5)
    # A simulator trained to answer activation bins has no Yes/No verdict: refused before any model loads.
    binned = tmp_path / "binned_run"
    shutil.copytree(out, binned)
    config = json.loads((binned / "run_config.json").read_text())
    config["config"]["script"]["prompt_format"] = "sim_value_v1"
    (binned / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="Yes/No verdicts"):
        whole.main(
            WholeLayerArguments(**{**args, "simulator": str(binned), "output_dir": str(tmp_path / "w2")})
        )

    # vLLM cannot read verdicts at text positions: refused with the reason, not scored some other way.
    with pytest.raises(ConfigError, match="backend: hf"):
        load_script("eval/sweep.py").main(
            EvalArguments(
                eval_set=str(assets / "eval_set"),
                run_dirs=[str(out)],
                output_dir=str(tmp_path / "eval_vllm"),
                backend="vllm",
                include_checkpoints=False,
            )
        )


def test_dense_loss_is_scaled_right_under_ddp(assets, tiny_model_dir, tmp_path):
    """Two CPU processes (gloo): each rank's loss is divided by the labels of every rank, then multiplied back
    by the number of processes, so the logged loss stays the per-label mean (~ln 2 at the start), not half or
    twice it."""
    state = run_accelerate(
        "configs/accelerate/multi_cpu.yaml",
        assets / "dense",
        tiny_model_dir,
        tmp_path / "ddp",
        extra=["--prompt_format", FMT],
    )
    first = next(e for e in state["log_history"] if "loss" in e)
    assert first["loss"] == pytest.approx(np.log(2), abs=0.15)
