"""Detection and fuzzing scores: prompts, the Yes/No judge, balanced accuracy, delphi's score files."""

import json

import numpy as np
import pytest
import torch
from helpers import build_tiny_tokenizer, load_script, make_cache

from latentsim.config import ExplainArguments, ScoreArguments
from latentsim.explain import Example
from latentsim.interpretation_scores import (
    balanced_accuracy,
    load_score_folder,
    scorer_items,
)
from latentsim.llm_client import hf_yes_probability
from latentsim.models import load_model_and_tokenizer


def examples(tok):
    ids = np.array(tok("the cat sat on a mat and ran far", add_special_tokens=False)["input_ids"])
    act = np.zeros(len(ids), np.float32)
    act[[1, 5]] = [4.0, 1.0]  # "cat" strong, "mat" below 0.3 x 4.0
    return [Example(0, 1, ids, act)], [Example(1, 1, ids, np.zeros(len(ids), np.float32)) for _ in range(2)]


def test_detection_and_fuzz_items():
    tok = build_tiny_tokenizer()
    act, non = examples(tok)
    det = scorer_items("detection", "cats", act, non, tok, np.random.default_rng(0))
    assert [i["activating"] for i in det] == [True, False, False]
    assert "<<" not in det[0]["text"] and "Interpretation: cats" in det[0]["prompt"]
    fuzz = scorer_items("fuzz", "cats", act, non, tok, np.random.default_rng(0))
    assert fuzz[0]["text"].count("<<") == 1 and "<<cat>>" in fuzz[0]["text"]  # mat is under the 0.3 threshold
    assert all(i["text"].count("<<") == 1 for i in fuzz[1:])  # as many random marks as the activating mean
    with pytest.raises(ValueError, match="scorer"):
        scorer_items("simulation", "x", act, non, tok, np.random.default_rng(0))


def test_balanced_accuracy():
    recs = [
        {"activating": True, "prediction": 1},
        {"activating": True, "prediction": 0},
        {"activating": False, "prediction": 0},
        {"activating": False, "prediction": 0},
        {"activating": False, "prediction": 1},
        {"activating": False, "prediction": 0},
    ]
    assert balanced_accuracy(recs) == pytest.approx((0.5 + 0.75) / 2)


def test_judge_reads_the_yes_no_logits(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    prompts = ["the cat sat", "a dog ran far away on the mat"]
    probs = hf_yes_probability(model, tok, prompts, batch_size=2)
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    for prompt, p in zip(prompts, probs, strict=True):  # unpadded, one at a time, full logits
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert p == pytest.approx(torch.softmax(logits[[no, yes]], 0)[1].item(), abs=1e-5)


def test_delphi_score_files(tmp_path):
    recs = [
        {"str_tokens": "x", "activating": True, "prediction": 1, "probability": 0.9, "correct": True},
        {"str_tokens": "y", "activating": False, "prediction": 1, "probability": 0.6, "correct": False},
    ]
    (tmp_path / "layers.3_latent12.txt").write_text(json.dumps(recs))
    assert load_score_folder(tmp_path, "layers.3") == {12: 0.5}
    with pytest.raises(ValueError, match="scores hookpoint"):
        load_score_folder(tmp_path, "layers.4")


def test_score_script_and_scores_in_the_prompt(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    make_cache(tmp_path / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40, ctx_len=20)
    load_script("data_gen/explain.py").main(
        ExplainArguments(
            cache_dir=str(tmp_path / "cache"),
            hookpoint="layers.1",
            explanations_dir=str(tmp_path / "expl"),
            window=8,
            min_activations=2,
        )
    )
    interp = str(tmp_path / "expl" / "token_list-quantiles")
    args = ScoreArguments(
        cache_dir=str(tmp_path / "cache"),
        hookpoint="layers.1",
        interpretations=interp,
        scores_dir=str(tmp_path / "scores"),
        scorer="fuzz",
        judge_model=str(tiny_model_dir),
        n_activating=3,
        n_non_activating=3,
        window=8,
        max_latents=6,
        batch_size=4,
    )
    script = load_script("data_gen/score.py")
    script.main(args)
    scores = json.loads((tmp_path / "scores" / "fuzz.json").read_text())
    assert len(scores) == 6 and all(0 <= v <= 1 for v in scores.values())
    files = sorted((tmp_path / "scores" / "fuzz").glob("*.txt"))
    records = json.loads(files[0].read_text())
    assert sum(r["activating"] for r in records) >= 1 and sum(not r["activating"] for r in records) == 3
    mtimes = [f.stat().st_mtime_ns for f in files]
    script.main(args)  # resumable: nothing is judged again
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # backend vllm (a stand-in engine): every latent's judgments in one call, one request per judgment, the
    # same items (texts, labels) as the hf run, each probability written back to its own latent and item.
    from latentsim import llm_client

    calls = []
    monkeypatch.setattr(llm_client, "require_vllm", lambda: None)
    monkeypatch.setattr(llm_client, "load_llm", lambda *a, **k: "engine")
    monkeypatch.setattr(
        llm_client,
        "vllm_yes_probability",
        lambda llm, ids, yes, no: calls.append(ids) or [i / 1000 for i in range(len(ids))],
    )
    script.main(
        ScoreArguments(**{**args.__dict__, "backend": "vllm", "scores_dir": str(tmp_path / "scores_vllm")})
    )
    assert len(calls) == 1 and len(calls[0]) == sum(len(json.loads(f.read_text())) for f in files)
    by_latent = lambda f: int(f.stem.rsplit("latent", 1)[1])  # noqa: E731  (the order latents are judged in)
    vllm_files = sorted((tmp_path / "scores_vllm" / "fuzz").glob("*.txt"), key=by_latent)
    assert [f.name for f in vllm_files] == [f.name for f in sorted(files, key=by_latent)]
    flat = [r for f in vllm_files for r in json.loads(f.read_text())]
    assert [r["probability"] for r in flat] == [i / 1000 for i in range(len(flat))]
    assert [(r["str_tokens"], r["activating"]) for r in flat] == [
        (r["str_tokens"], r["activating"])
        for f in sorted(files, key=by_latent)
        for r in json.loads(f.read_text())
    ]

    from latentsim.config import DatasetArguments

    out = tmp_path / "ds"
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            cache_dir=str(tmp_path / "cache"),
            hookpoint="layers.1",
            interpretations=[interp],
            score_path=str(tmp_path / "scores" / "fuzz.json"),
            simulator_tokenizer=str(tiny_model_dir),
            output_dir=str(out),
            window_min=4,
            window_max=8,
            split_mode="contexts",
        )
    )
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert rows and all(str(r["latent"]) in scores for r in rows)  # unscored latents are left out
    r = rows[0]
    assert r["prompt"][0]["content"].endswith(f"Interpretation score: {scores[str(r['latent'])]:.2f}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_vllm_backend_fails_clearly_without_a_gpu(tmp_path):
    args = ScoreArguments(cache_dir=str(tmp_path), interpretations=str(tmp_path), backend="vllm")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_script("data_gen/score.py").main(args)
    explain = ExplainArguments(
        cache_dir=str(tmp_path), explainer="llm", backend="vllm", explanations_dir=str(tmp_path / "e")
    )
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_script("data_gen/explain.py").main(explain)
