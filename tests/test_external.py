"""Importing interpretations written elsewhere (latentsim.external, data_gen/import_records.py): marked spans
aligned to another tokenizer by characters, the tables, and the shared records' recorded numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import build_char_tokenizer, build_tiny_tokenizer, load_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from latentsim.config import ImportRecordsArguments
from latentsim.errors import BadInputError, ConfigError
from latentsim.external import (
    carry_values,
    mark_tokens,
    parse_marked,
    recorded_scores,
    simulator_tokens,
    subject_spans,
    subject_to_simulator,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "external" / "gpt2-sae-auto-interp"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained in-process: leading spaces belong to the next token and a
    character outside its merges is split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "fifty seven everybody somebody"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_parse_marked_keeps_stray_brackets_as_text():
    assert parse_marked("a<<b>>c") == ("abc", [(1, 2)])
    assert parse_marked("<<x>><<yz>>") == ("xyz", [(0, 1), (1, 3)])
    # A `>>` outside a mark and a `<<` never closed are the text's own (the shared data quotes both).
    assert parse_marked("style. more >>\n<<B>> and <<c") == ("style. more >>\nB and <<c", [(15, 16)])


def test_marks_land_on_the_tokens_that_overlap_them_whatever_the_tokenizer():
    text, marks = parse_marked("F<<ifty>>-seven, said<< everybody>>.")
    assert text[slice(*marks[0])] == "ifty" and text[slice(*marks[1])] == " everybody"
    # Characters: every marked character is a token of its own; nothing widened, nothing lost.
    chars = simulator_tokens(build_char_tokenizer(), text)
    marked, report = mark_tokens(chars, marks, text)
    assert "".join(text[s:e] for (s, e), m in zip(chars, marked, strict=True) if m) == "ifty everybody"
    assert (report.marks, report.uncovered, report.widened) == (2, 0, 0)
    # Words (whitespace split, unknown words one <unk> each): `ifty` lies inside the token `Fifty-seven,`.
    words = simulator_tokens(build_tiny_tokenizer(), text)
    marked, report = mark_tokens(words, marks, text)
    assert [text[s:e] for (s, e), m in zip(words, marked, strict=True) if m] == ["Fifty-seven,", "everybody."]
    assert (report.uncovered, report.widened) == (0, 2)
    # Byte-level BPE: the leading space belongs to the simulator's token, as it did to GPT-2's.
    bpe = byte_level_tokenizer()
    tokens = simulator_tokens(bpe, text)
    marked, _ = mark_tokens(tokens, marks, text)
    assert any(text[s:e] == " everybody" for (s, e), m in zip(tokens, marked, strict=True) if m)
    # An empty mark covers no token: counted, with where it was, never guessed.
    _, report = mark_tokens(tokens, [(3, 3)], text)
    assert report.uncovered == 1 and report.examples


def test_bytes_of_one_character_are_one_span():
    bpe = byte_level_tokenizer()
    text = "the caf\u00e9 \U0001f600 sat"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    spans = simulator_tokens(bpe, text)
    assert len(spans) < len(ids)  # the emoji's bytes are several tokens, one span
    assert [text[s:e] for s, e in spans if "\U0001f600" in text[s:e]] in (["\U0001f600"], [" \U0001f600"])
    assert all(b > a for a, b in spans) and spans[-1][1] == len(text)
    text_marked = "the caf<<\u00e9>> sat"
    plain, marks = parse_marked(text_marked)
    marked, report = mark_tokens(simulator_tokens(bpe, plain), marks, plain)
    assert marked.sum() >= 1 and report.uncovered == 0


def test_subject_values_and_reading_positions_cross_tokenizers():
    pieces = ["F", "ifty", " seven", " cats"]
    subject = subject_spans(pieces)
    text = "".join(pieces)
    words = simulator_tokens(build_tiny_tokenizer(), text)  # "Fifty" " seven" " cats": 3 tokens
    assert [text[s:e] for s, e in words] == ["Fifty", "seven", "cats"]
    np.testing.assert_array_equal(carry_values(words, subject, [1.0, 3.0, 0.0, 2.0]), [3.0, 0.0, 2.0])
    # Each subject token is read where its last character is: F and ifty at "Fifty".
    assert subject_to_simulator(words, subject) == [0, 0, 1, 2]
    assert subject_to_simulator(words, subject_spans(["Fifty", "", " seven", " cats"])) == [0, -1, 1, 2]


def scored_record(index: int, yes_rate: float, rng) -> dict:
    recall = [
        {"id": 1000 * index + t, "distance": 1 if t < 6 else -1, "ground_truth": t < 6,
         "prediction": bool(rng.random() < yes_rate), "highlighted": False, "text": f"the cat sat {t}"}
        for t in range(10)
    ]  # fmt: skip
    fuzz = [
        {"id": 2000 * index + t, "distance": 2, "ground_truth": t < 5, "prediction": t < 7,
         "highlighted": True, "text": "the <<cat>> <<sat>><|endoftext|> on"}
        for t in range(10)
    ]  # fmt: skip
    return {
        "layer": 2, "index": index, "explanation": f" The word cat {index} ", "explainer": "x",
        "train_examples_quantised": [
            {"text_marked": "a <<cat>> and a <<dog>>", "activating_tokens": [["cat", 3], ["dog", 7]]},
            {"text_marked": "the <<mat>>", "activating_tokens": [["mat", 2], ["extra", 9]]},
        ],
        "test_recall": recall, "test_fuzz": fuzz,
    }  # fmt: skip


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_import_writes_aligned_tables_and_the_recorded_scores(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(0)
    records = [scored_record(i, 0.5, rng) for i in range(4)]
    per_token = {
        "layer": 0, "index": 9, "explanation": "cats", "ev_correlation_score": 0.5,
        "records": [{"tokens": ["the", " c", "at"], "activations": [0.0, 1.0, 2.0],
                     "simulated_activations": [0.0, 0.0, 3.0]}],
    }  # fmt: skip
    path = write_records(tmp_path / "records.jsonl", [*records, per_token])
    main = load_script("data_gen/import_records.py").main
    out = tmp_path / "imported"
    args = ImportRecordsArguments(
        records=str(path), output_dir=str(out), simulator_tokenizer=str(tiny_model_dir)
    )
    main(args)
    latents = pd.read_parquet(out / "latents.parquet")
    assert latents["split"].tolist().count("test") == 3  # 2 of the 4 scored latents + the per-token one
    assert latents.loc[4, "kind"] == "per_token" and latents.loc[4, "split"] == "test"
    assert latents.loc[0, "explanation"] == "The word cat 0"
    fuzz = pd.read_parquet(out / "fuzz.parquet")
    # The separator became a paragraph break; the marks are on `cat` and `sat`.
    assert fuzz.loc[0, "text"] == "the cat sat\n\n on"
    words = fuzz.loc[0, "text"].split()
    assert [w for w, m in zip(words, fuzz.loc[0, "token_marked"], strict=True) if m] == ["cat", "sat"]
    train = pd.read_parquet(out / "train_texts.parquet")
    assert train.loc[0, "token_values"].tolist() == [0.0, 3.0, 0.0, 0.0, 7.0]
    assert train.loc[1, "token_values"].tolist() == [0.0, 9.0]  # marks and values unpaired: the max, counted
    stats = json.loads((out / "import_stats.json").read_text())
    assert stats["value_fallbacks"] == 4 and stats["separators_replaced"] == 40
    assert stats["alignment"]["fuzz"] == {"marks": 80, "uncovered": 0, "widened": 0, "uncovered_examples": []}
    # Balanced accuracy of the recorded answers, by hand: fuzz says yes on 7 of 10 with 5 true ones.
    assert stats["recorded"]["fuzz"]["all"]["mean"] == pytest.approx((1.0 + 3 / 5) / 2)
    detection = pd.read_parquet(out / "detection.parquet")
    by_hand = [
        (g.recorded[g.label].mean() + (~g.recorded[~g.label]).mean()) / 2
        for _, g in detection.groupby("latent")
    ]
    assert stats["recorded"]["detection"]["all"]["mean"] == pytest.approx(np.mean(by_hand))
    per = pd.read_parquet(out / "per_token.parquet").iloc[0]
    assert per["text"] == "the cat" and per["token_activations"].tolist() == [0.0, 2.0]
    assert per["subject_to_simulator"].tolist() == [0, 1, 1]
    # A rerun finds the finished import; another config for the same folder is refused.
    main(args)
    assert "holds this import already" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="held_out_fraction"):
        main(ImportRecordsArguments(**{**vars(args), "held_out_fraction": 0.25}))


def test_bad_records_are_named_by_line(tmp_path, tiny_model_dir):
    main = load_script("data_gen/import_records.py").main
    path = write_records(tmp_path / "bad.jsonl", [{"layer": 1, "index": 2, "explanation": "x"}])
    args = dict(output_dir=str(tmp_path / "o"), simulator_tokenizer=str(tiny_model_dir))
    with pytest.raises(BadInputError, match=r"bad.jsonl:1: a scored record lacks"):
        main(ImportRecordsArguments(records=str(path), **args))
    with pytest.raises(ConfigError, match="`records`"):
        ImportRecordsArguments(records=str(tmp_path / "missing.jsonl"), **args)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared external data is absent ({SHARED})")
def test_the_shared_records_reproduce_what_their_readme_states(tmp_path):
    from latentsim.external import import_records

    tokenizer = build_char_tokenizer()  # any simulator tokenizer: the recorded numbers do not depend on it
    scored = import_records(SHARED / "latents.jsonl", tokenizer, 0.5, 22)
    detection, fuzz = pd.DataFrame(scored.detection), pd.DataFrame(scored.fuzz)
    recorded = recorded_scores(
        {"latents": pd.DataFrame(scored.latents), "detection": detection, "fuzz": fuzz}
    )
    # README: "detection answers say yes for 81% of texts; balanced accuracy 0.51 (fuzz: 0.65)".
    assert recorded["detection"]["said_yes"] == pytest.approx(0.81, abs=0.005)
    assert recorded["detection"]["all"]["mean"] == pytest.approx(0.51, abs=0.005)
    assert recorded["fuzz"]["all"]["mean"] == pytest.approx(0.65, abs=0.005)
    assert len(scored.latents) == 160 and len(detection) == 160 * 70
    per_token = import_records(SHARED / "per_token_layer0.jsonl", tokenizer, 0.5, 22)
    # The recorded correlation is Pearson r over every token of a latent's records, exactly.
    table = pd.DataFrame(per_token.per_token)
    for latent in per_token.latents:
        rows = table[table.latent == latent["latent"]]
        true = np.concatenate(rows.activations.tolist())
        simulated = np.concatenate(rows.simulated_activations.tolist())
        assert np.corrcoef(true, simulated)[0, 1] == pytest.approx(latent["recorded_correlation"], abs=1e-9)
    assert np.mean([x["recorded_correlation"] for x in per_token.latents]) == pytest.approx(0.76, abs=0.005)


def test_text_metrics_fit_each_threshold_on_the_other_latents():
    from latentsim.external_eval import paired, text_metrics

    df = pd.DataFrame({"latent": np.repeat([0, 1, 2], 4), "label": [True, True, False, False] * 3})
    perfect = text_metrics(df, np.array([0.9, 0.8, 0.1, 0.2] * 3), seed=0)
    assert perfect["auc"]["mean"] == 1.0 and perfect["balanced_accuracy"]["mean"] == 1.0
    # Latent 2's scores sit on another scale: the threshold the others fit misses it, the AUC does not.
    shifted = np.array([0.9, 0.8, 0.1, 0.2, 0.9, 0.8, 0.1, 0.2, 0.09, 0.08, 0.01, 0.02])
    m = text_metrics(df, shifted, seed=0)
    assert m["per_latent"]["2"]["auc"] == 1.0 and m["per_latent"]["2"]["balanced_accuracy"] == 0.5
    inverted = text_metrics(df, np.array([0.1, 0.2, 0.9, 0.8] * 3), seed=0)
    assert inverted["auc"]["mean"] == 0.0
    diff = paired(perfect["per_latent"], inverted["per_latent"], "auc", seed=0)
    assert diff["mean"] == 1.0 and diff["ci95"] == [1.0, 1.0]


def test_dense_answers_are_the_verdicts_at_the_texts_tokens(tiny_model_dir):
    """Detection: the largest P(yes) over the text's tokens; fuzz: the mean over its marked tokens; per
    token: the verdict of the simulator token holding each subject token's last character. Each equals a full
    forward of the dense example."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentsim.external_eval import dense_scores
    from latentsim.prompts import answer_token_ids
    from latentsim.simulators.base import probabilities
    from latentsim.simulators.hf import DenseScorer, naive_dense_logits

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = answer_token_ids("sim_dense_v1", tok)
    scorer = DenseScorer(model, tok, ids, batch_size=4, fmt="sim_dense_v1")
    texts = ["the cat sat on a mat", "a dog ran far away"]
    rows = []
    for text in texts:
        ends = [e for _, e in simulator_tokens(tok, text)]
        marked = [j in (1, 3) for j in range(len(ends))]
        reads = [0, 0, 2, -1]
        rows.append(
            {
                "latent": 7,
                "text": text,
                "token_ends": ends,
                "token_marked": marked,
                "subject_to_simulator": reads,
            }
        )
    df = pd.DataFrame(rows)
    explanations = {7: "the word cat"}
    p_tokens = [
        probabilities(naive_dense_logits(model, tok, "sim_dense_v1", explanations[7], t, list(e), ids))[:, 1]
        for t, e in zip(df.text, df.token_ends, strict=True)
    ]
    detection = dense_scores(scorer, df, "detection", explanations)
    fuzz = dense_scores(scorer, df, "fuzz", explanations)
    per_token = dense_scores(scorer, df, "per_token", explanations)
    for i, p in enumerate(p_tokens):
        assert detection[i] == pytest.approx(p.max(), abs=1e-5)
        assert fuzz[i] == pytest.approx(p[[1, 3]].mean(), abs=1e-5)
        np.testing.assert_allclose(per_token[i], [p[0], p[0], p[2], 0.0], atol=1e-5)


def test_an_import_round_trips_through_scoring(tmp_path, tiny_model_dir):
    """Import, then score: the oracle reaches AUC, balanced accuracy and r of 1; the recorded answers score
    what the import recorded; a prompted model and string match answer every text."""
    rng = np.random.default_rng(1)
    records = [scored_record(i, 0.7, rng) for i in range(6)]
    per_token = [
        {"layer": 0, "index": 20 + i, "explanation": "cats", "ev_correlation_score": 0.5,
         "records": [{"tokens": ["the", " cat", " sat"], "activations": [0.0, 1.0 + i, 0.0],
                      "simulated_activations": [0.0, 1.0, 1.0]},
                     {"tokens": ["a", " dog"], "activations": [0.5, 0.0],
                      "simulated_activations": [0.0, 0.0]}]}
        for i in range(3)
    ]  # fmt: skip
    path = write_records(tmp_path / "records.jsonl", [*records, *per_token])
    imported = tmp_path / "imported"
    tokenizer = str(tiny_model_dir)
    load_script("data_gen/import_records.py").main(
        ImportRecordsArguments(records=str(path), output_dir=str(imported), simulator_tokenizer=tokenizer)
    )
    from latentsim.config import ExternalEvalArguments

    out = tmp_path / "scores"
    args = ExternalEvalArguments(
        eval_set=str(imported), prompted=[str(tiny_model_dir)], shots=[0, 2],
        references=["oracle", "recorded", "string_match"], max_texts=6, output_dir=str(out), device="cpu",
    )  # fmt: skip
    load_script("eval/score_external.py").main(args)
    summary = json.loads((out / "imported" / "summary.json").read_text())
    rows = {r["simulator"]: r for r in summary["rows"]}
    assert rows["reference__oracle"]["detection auc"].startswith("1.000 [1.00, 1.00]")
    assert rows["reference__oracle"]["fuzz balanced_accuracy"].startswith("1.000 [1.00, 1.00]")
    assert rows["reference__oracle"]["per_token r"].startswith("1.000")
    results = json.loads((out / "imported" / "reference__recorded" / "results.json").read_text())
    held_out = pd.read_parquet(out / "imported" / "reference__recorded" / "predictions_fuzz.parquet")
    assert held_out.latent.nunique() == 3 and len(held_out) == 3 * 6  # 3 of the 6 scored latents held out
    # Recorded fuzz answers say yes on 7 of 10 texts (5 true): the balanced accuracy of each latent by hand.
    fuzz = pd.read_parquet(imported / "fuzz.parquet").set_index("text_id")
    for latent, m in results["metrics"]["fuzz"]["per_latent"].items():
        texts = held_out[held_out.latent == int(latent)]
        truth, said = fuzz.loc[texts.text_id, "label"].to_numpy(), texts.answer.to_numpy() >= 0.5
        assert m["balanced_accuracy"] == pytest.approx((said[truth].mean() + (~said[~truth]).mean()) / 2)
    # A rerun scores only what is new; its paired difference reads the recorded answers' stored results.
    load_script("eval/score_external.py").main(
        ExternalEvalArguments(**{**vars(args), "references": ["recorded", "lexical"], "prompted": []})
    )
    rerun = {r["simulator"]: r for r in json.loads((out / "imported" / "summary.json").read_text())["rows"]}
    assert rerun["reference__lexical"]["detection balanced_accuracy - recorded"] != "-"
    prompted = [n for n in rows if n.endswith("-shot")]
    assert len(prompted) == 2 and all(rows[n]["detection auc"] != "-" for n in prompted)
    assert "per_token r" not in rows[prompted[0]] or rows[prompted[0]]["per_token r"] == "-"


def test_free_text_training_mixes_the_marked_texts_and_keeps_held_out_latents_out(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    """import_records writes the training latents' marked texts as a dense set; train/sft.py mixes it into a
    token-list mixture (extra_datasets); the result is scored on the records' held-out latents, and refused
    on an import whose held-out latents it trained on."""
    from helpers import make_explained_cache, sft_args

    from latentsim.config import DatasetArguments, ExternalEvalArguments

    records = [scored_record(i, 0.6, np.random.default_rng(i)) for i in range(6)]
    path = write_records(tmp_path / "records.jsonl", records)
    importer = load_script("data_gen/import_records.py").main
    imported = tmp_path / "imported"
    importer(
        ImportRecordsArguments(
            records=str(path), output_dir=str(imported), simulator_tokenizer=str(tiny_model_dir)
        )
    )
    dense = pd.read_parquet(imported / "dense_train" / "train.parquet")
    latents = pd.read_parquet(imported / "latents.parquet").set_index("latent")
    assert set(dense.latent) == set(latents.index[latents.split == "train"]) and len(dense) == 3 * 2
    assert dense.loc[0, "token_labels"].tolist() == [0, 1, 0, 0, 1]  # "a <<cat>> and a <<dog>>"
    assert (dense.prompt_format == "sim_dense_v1").all() and (dense.row == -1).all()

    make_explained_cache(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            cache_dir=str(tmp_path / "cache"), hookpoint="layers.1", simulator_tokenizer=str(tiny_model_dir),
            interpretations=[str(tmp_path / "expl" / "token_list-quantiles")], window_min=4, window_max=6,
            positives="top_k", top_k=3, prompt_format="sim_dense_v1", validation_fraction=0.2,
            test_fraction=0.2, seed=3, output_dir=str(tmp_path / "dense"),
        )
    )  # fmt: skip
    out = tmp_path / "run"
    script = {"prompt_format": "sim_dense_v1", "extra_datasets": [str(imported / "dense_train")],
              "dataset_weights": [0.5, 0.5]}  # fmt: skip
    load_script("train/sft.py").main(
        *sft_args(tmp_path / "dense", tiny_model_dir, out, script=script, training={"max_steps": 4})
    )
    assert json.loads((out / "eval_results.json").read_text())["prompt_format"] == "sim_dense_v1"
    scores = tmp_path / "scores"
    common = dict(
        run_dirs=[str(out)], references=["recorded"], max_texts=4, output_dir=str(scores), device="cpu"
    )
    load_script("eval/score_external.py").main(ExternalEvalArguments(eval_set=str(imported), **common))
    rows = json.loads((scores / "imported" / "summary.json").read_text())["rows"]
    assert [r["simulator"] for r in rows] == ["run__final", "reference__recorded"]
    assert rows[0]["detection auc"] != "-" and "fuzz balanced_accuracy - recorded" in rows[0]
    # Another split of the same records holds out latents the simulator trained on: refused.
    other = tmp_path / "other_split"
    importer(
        ImportRecordsArguments(
            records=str(path), output_dir=str(other), simulator_tokenizer=str(tiny_model_dir), seed=5
        )
    )
    trained = set(dense.latent)
    held_out = set(pd.read_parquet(other / "latents.parquet").query("split == 'test'").latent)
    assert trained & held_out  # the seed moved some of them
    with pytest.raises(BadInputError, match="trained on .* held-out latents"):
        load_script("eval/score_external.py").main(ExternalEvalArguments(eval_set=str(other), **common))


def test_the_lexical_reader_learns_the_cues_of_free_text_from_training_latents(tmp_path, tiny_model_dir):
    """Planted: each latent fires on its quoted word. Fitted on the training latents' texts alone, the lexical
    reader separates held-out latents' texts and tokens by that word; the words differ across latents, so only
    reading the explanation can do it."""
    from latentsim.external_eval import ExternalSet, text_metrics, token_metrics
    from latentsim.external_lexical import ExternalLexicalReader

    def record(i: int) -> dict:
        word = f"w{i}x"
        texts = [
            (f"one {word} two", True),
            (f"two {word}", True),
            ("one two three", False),
            ("three one", False),
        ]
        return {
            "layer": 1, "index": i, "explanation": f'The word "{word}", in any context.',
            "train_examples_quantised": [
                {"text_marked": f"one <<{word}>> two", "activating_tokens": [[word, 5]]},
                {"text_marked": f"<<{word}>> three", "activating_tokens": [[word, 4]]},
            ],
            "test_recall": [
                {"id": 10 * i + t, "distance": 1, "ground_truth": y, "prediction": True, "text": x}
                for t, (x, y) in enumerate(texts)
            ],
            "test_fuzz": [
                {"id": 10 * i + t, "distance": 1, "ground_truth": y, "prediction": True,
                 "text": f"one <<{word}>> two" if y else f"<<one>> {word} two"}
                for t, (_, y) in enumerate(texts)
            ],
        }  # fmt: skip

    per_token = [
        {"layer": 0, "index": 100 + i, "explanation": f'The word "w{i}x".', "ev_correlation_score": 0.0,
         "records": [{"tokens": ["one", f" w{i}x", " two"], "activations": [0.0, 2.0, 0.0],
                      "simulated_activations": [0.0, 0.0, 0.0]},
                     {"tokens": ["three", " one"], "activations": [0.0, 0.0],
                      "simulated_activations": [0.0, 0.0]}]}
        for i in range(8, 11)
    ]  # fmt: skip
    path = write_records(tmp_path / "records.jsonl", [record(i) for i in range(8)] + per_token)
    out = tmp_path / "imported"
    load_script("data_gen/import_records.py").main(
        ImportRecordsArguments(
            records=str(path), output_dir=str(out), simulator_tokenizer=str(tiny_model_dir)
        )
    )
    external = ExternalSet.open(out)
    reader = ExternalLexicalReader(external, seed=0)
    for kind in ("detection", "fuzz"):
        df = external.held_out(kind, 0, 0, seed=0)
        assert set(df.latent).isdisjoint(set(reader.training_frame(kind).latent))
        assert text_metrics(df, np.array(reader.scores(df, kind)), seed=0)["auc"]["mean"] == 1.0
    df = external.held_out("per_token", 0, 0, seed=0)
    assert token_metrics(df, reader.scores(df, "per_token"), seed=0)["r"]["mean"] > 0.9
    assert reader.fitted["per_token"]["positives"] == 4 * 2  # the 4 training latents' marked tokens
