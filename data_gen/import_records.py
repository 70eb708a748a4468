"""Import interpretations written elsewhere (records of the sae-auto-interp schema) as latentsim tables.

    python data_gen/import_records.py --records ../shared/external/gpt2-sae-auto-interp/latents.jsonl \
        --output_dir outputs/external/gpt2-latents [--simulator_tokenizer embedded:smollm2-135m]

Writes into the output folder, one row per text (latentsim.external: texts aligned to the simulator's tokens
by characters):
- `latents.parquet`: each latent's explanation, its split (`train` or held-out `test`, seeded) and kind;
- `detection.parquet` (the `test_recall` texts: does the latent fire anywhere), `fuzz.parquet` (the marked
  `test_fuzz` texts: are the marks where it fires), both with the explainer's recorded answer (`recorded`);
- `train_texts.parquet`: the marked texts the explanations were written from, as per-token labels;
- `per_token.parquet`: texts with the true activation at every token and the explainer's simulation;
- `dense_train/train.parquet`: the training latents' marked texts as dense examples (sim_dense_v1), for
  train/sft.py's `extra_datasets` (configs/sft/smollm2-135m_dense_external_quickstart.yaml);
- `import_stats.json`: counts, marks no simulator token covers (reported, never guessed), the recorded
  answers' balanced accuracy (all latents and held-out ones) and the recorded simulation's correlation.
A rerun with the same config finds the finished import and skips it.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.cli import run
from latentsim.config import ImportRecordsArguments
from latentsim.external import dense_training_rows, import_records, recorded_scores
from latentsim.io import atomic_save, atomic_write_json, require_same_config, write_run_config
from latentsim.models import load_tokenizer

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ImportRecordsArguments,)
TABLES = ("latents", "detection", "fuzz", "train_texts", "per_token")
DENSE_TRAIN = "dense_train"  # train/sft.py reads it as an `extra_datasets` entry


def main(args: ImportRecordsArguments) -> None:
    out = Path(args.output_dir)
    require_same_config(
        out, {"import": args}, set(), "an import", "choose another output_dir", finished="import_stats.json"
    )
    if (out / "import_stats.json").is_file():
        stats = json.loads((out / "import_stats.json").read_text())
        print(f"[import] {out} holds this import already ({stats['latents']} latents); nothing to do.")
        return
    tokenizer = load_tokenizer(args.simulator_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "import_records", {"import": args}, args.seed)
    imported = import_records(args.records, tokenizer, args.held_out_fraction, args.seed)
    tables = {name: pd.DataFrame(getattr(imported, name)) for name in TABLES}
    for name, df in tables.items():
        if not df.empty:
            atomic_save(out / f"{name}.parquet", lambda p, df=df: df.to_parquet(p, index=False))
    latents = tables["latents"]
    stats = {
        "records": str(Path(args.records).resolve()),
        "latents": int(len(latents)),
        "splits": latents["split"].value_counts().to_dict(),
        "rows": {name: int(len(df)) for name, df in tables.items() if name != "latents"},
        "alignment": {name: a.as_dict() for name, a in imported.alignment.items()},
        "separators_replaced": imported.separators,
        "value_fallbacks": imported.value_fallbacks,
        "recorded": recorded_scores(tables),
    }
    if not tables["train_texts"].empty:  # the training latents' marked texts, a dense training set
        dense = pd.DataFrame(dense_training_rows(tables["train_texts"], latents, str(out)))
        folder = out / DENSE_TRAIN
        folder.mkdir(exist_ok=True)
        # Its latents are the records' own: latentsim.held_out compares them only with this same source.
        source = {"cache_dir": str(Path(args.records).resolve()), "hookpoint": "external"}
        write_run_config(folder, "import_records", {"dataset": source, "import": args}, args.seed)
        atomic_save(folder / "train.parquet", lambda p: dense.to_parquet(p, index=False))
        stats["dense_train"] = {"folder": str(folder), "examples": len(dense)}
    atomic_write_json(out / "import_stats.json", stats)  # last: it marks the import finished
    lost = sum(a.uncovered for a in imported.alignment.values())
    recorded = stats["recorded"]
    summary = "; ".join(
        f"recorded {name} balanced accuracy {recorded[name]['all']['mean']:.3f} mean over latents"
        for name in ("detection", "fuzz")
        if name in recorded
    )
    print(
        f"[import] {len(latents)} latents ({stats['splits']}), {stats['rows']} rows -> {out}; "
        f"{lost} marks covered by no simulator token (import_stats.json)"
        + (f"; {summary}" if summary else "")
        + (
            f"; recorded simulation r {np.mean(latents['recorded_correlation'].dropna()):.3f}"
            if latents["recorded_correlation"].notna().any()
            else ""
        )
    )


if __name__ == "__main__":
    run(main, DATACLASSES)
