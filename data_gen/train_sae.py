"""Train a TopK SAE with sae-lens on a subject model's residual stream (for models without a pretrained SAE).

    python data_gen/train_sae.py --config configs/data/sae_smollm2-135m_l15.yaml [--key value ...]

Collects residuals after layer N over corpus rows (position 0 dropped: its norm is ~100x the rest and ruins
an SAE; so are the rare other tokens with such massive norms), trains sae-lens' TopKTrainingSAE on them, and
saves a normal sae-lens folder (`cfg.json` + `sae_weights.safetensors`, loadable with `SAE.load_from_disk`)
with `training_report.json`: fraction of variance explained, L0 and dead latents on held-out rows.
"""

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latentsim.cli import run
from latentsim.config import CorpusArguments, ModelArguments, TrainSAEArguments
from latentsim.corpus import corpus_rows, load_corpus_from_args
from latentsim.io import atomic_write_json, require_same_config, write_run_config
from latentsim.models import describe_model_source, load_model_and_tokenizer
from latentsim.sae import check_hookpoint, drop_norm_outliers, residual_at, sae_quality, train_topk_sae

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ModelArguments, CorpusArguments, TrainSAEArguments)


def collect_residuals(model, rows: torch.Tensor, layer: int, batch_size: int, desc: str) -> torch.Tensor:
    """Residuals after `layer` for every non-BOS token of `rows`, as [tokens, d_model] float32."""
    out = []
    with tqdm(total=rows.numel(), desc=desc, unit="tok", unit_scale=True) as bar:
        for i in range(0, rows.shape[0], batch_size):
            h = residual_at(model, rows[i : i + batch_size].to(model.device), layer, stop=True)[:, 1:]
            out.append(h.reshape(-1, h.shape[-1]).float().cpu())
            bar.update(rows[i : i + batch_size].numel())
    return torch.cat(out)


def main(model_args: ModelArguments, corpus_args: CorpusArguments, args: TrainSAEArguments) -> None:
    out = Path(args.output_dir)
    configs = {"model": model_args, "corpus": corpus_args, "train_sae": args}
    if (out / "training_report.json").is_file() and (out / "cfg.json").is_file() and not args.overwrite:
        require_same_config(
            out,
            configs,
            {"train_sae.overwrite", "train_sae.batch_size"},
            "an SAE",
            "set --overwrite true to retrain, or choose another output_dir",
        )
        print(f"[train_sae] {out} already holds a trained SAE; skipping (set --overwrite true to retrain).")
        return
    torch.manual_seed(corpus_args.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "train_sae", configs, corpus_args.seed)

    corpus = load_corpus_from_args(corpus_args)
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype=model_args.model_dtype,
        device=model_args.device,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    layer = check_hookpoint(model, args.hookpoint)
    # Training rows first, then `eval_rows` held-out rows right after them.
    rows = corpus_rows(
        dataclasses.replace(corpus_args, n_rows=corpus_args.n_rows + args.eval_rows), tokenizer, corpus
    ).tokens
    train_x = collect_residuals(model, rows[: -args.eval_rows], layer, args.batch_size, "residuals (train)")
    eval_x = collect_residuals(model, rows[-args.eval_rows :], layer, args.batch_size, "residuals (held out)")
    del model
    train_x, train_outliers = drop_norm_outliers(train_x, args.outlier_norm_factor)
    eval_x, eval_outliers = drop_norm_outliers(eval_x, args.outlier_norm_factor)
    print(
        f"[train_sae] left out {train_outliers + eval_outliers} tokens with residual norm > "
        f"{args.outlier_norm_factor:g}x the median (massive activations)"
    )

    start = time.perf_counter()
    sae = train_topk_sae(
        train_x,
        args.d_sae,
        args.k,
        args.training_tokens,
        args.train_batch_size_tokens,
        args.lr,
        args.lr_end_fraction,
        corpus_args.seed,
        hook_name=args.hookpoint,
        model_name=model_args.model_name_or_path,
    )
    train_seconds = time.perf_counter() - start

    tmp = Path(tempfile.mkdtemp(prefix=".sae.", dir=out.parent))
    sae.save_inference_model(str(tmp))
    for name in ("cfg.json", "sae_weights.safetensors"):
        (tmp / name).replace(out / name)  # same filesystem: atomic per file
    shutil.rmtree(tmp, ignore_errors=True)

    from sae_lens import SAE

    saved = SAE.load_from_disk(str(out))  # measure what was saved, not what is in memory
    report = {
        "held_out": sae_quality(saved, eval_x),
        "train": sae_quality(saved, train_x),
        "d_sae": args.d_sae,
        "k": args.k,
        "hookpoint": args.hookpoint,
        "training_samples": args.training_tokens,
        "distinct_training_tokens": int(train_x.shape[0]),
        "train_seconds": round(train_seconds, 1),
        "position_0_excluded": True,
        "norm_outliers_excluded": {
            "factor": args.outlier_norm_factor,
            "train": train_outliers,
            "held_out": eval_outliers,
        },
        "model": describe_model_source(model_args.model_name_or_path),
    }
    atomic_write_json(out / "training_report.json", report)
    held = report["held_out"]
    print(
        f"[train_sae] saved {out}: held-out FVE {held['fve']:.3f}, L0 {held['l0']:.1f}, "
        f"dead latents {report['train']['dead_fraction']:.1%} (over {train_x.shape[0]} training tokens)"
    )


if __name__ == "__main__":
    run(main, DATACLASSES)
