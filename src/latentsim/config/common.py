"""Arguments every stage shares (the subject model, the corpus, the SAE) and the validation helpers.

`__post_init__` validates values without touching the disk or the network; files are checked by each stage
before it loads any model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from latentsim.errors import ConfigError

EMBEDDED_PREFIX = "embedded:"
HOOKPOINT_RE = re.compile(r"^(?:model\.)?layers\.(\d+)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key `{key}`: {message}")


def _require_positive(args, *keys: str) -> None:
    for key in keys:
        if getattr(args, key) < 1:
            _fail(key, f"must be >= 1, got {getattr(args, key)}.")


def _check_embedded(key: str, ref: str, known, kind: str) -> None:
    """An `embedded:<name>` reference must name one of the `known` embedded models or corpora."""
    name = ref.removeprefix(EMBEDDED_PREFIX)
    if ref.startswith(EMBEDDED_PREFIX) and name not in known:
        _fail(key, f"unknown embedded {kind} {name!r}; choose one of {[EMBEDDED_PREFIX + k for k in known]}.")


def check_dtype_device(args) -> None:
    """The `dtype` and `device` of a stage that loads a model."""
    check_dtype("dtype", args.dtype)
    check_device("device", args.device)


def dtype_field():
    """The `dtype` knob of every stage that loads a model (one help text, one set of values: DTYPES)."""
    return field(
        default="auto",
        metadata={"help": "`auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16` or `float16`."},
    )


def device_field(scope: str = ""):
    """The `device` knob of every stage that runs a model; `scope` says when it applies (e.g. "`llm`: ")."""
    return field(
        default="auto", metadata={"help": f"{scope}`auto` (cuda if available), `cpu`, `cuda`, `cuda:N`."}
    )


def check_dtype(key: str, value: str | None) -> None:
    """Model dtypes the loaders accept (`auto`: float32 on CPU, bfloat16 on GPU); None is the loader's
    default."""
    if value is not None and value not in DTYPES:
        _fail(key, f"{value!r} is not one of {', '.join(DTYPES)}.")


def check_device(key: str, value: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        _fail(key, f"{value!r} is not one of auto, cpu, cuda, cuda:N.")


@dataclass
class ModelArguments:
    """The subject model whose activations are recorded."""

    model_name_or_path: str = field(
        default="embedded:smollm2-135m",
        metadata={
            "help": "Hub id, local folder, or an embedded model (`embedded:smollm2-135m`, "
            "`embedded:gemma3-270m`)."
        },
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit)."}
    )
    model_dtype: str = dtype_field()
    device: str = device_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub (off by default)."}
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            _fail("model_name_or_path", "is empty; give a Hub id, a local folder or `embedded:smollm2-135m`.")
        from latentsim.models import EMBEDDED_MODELS

        _check_embedded("model_name_or_path", self.model_name_or_path, EMBEDDED_MODELS, "model")
        check_dtype("model_dtype", self.model_dtype)
        check_device("device", self.device)


@dataclass
class CorpusArguments:
    """The text corpus, tokenized into fixed-length rows (BOS + ctx_len-1 tokens, documents joined by EOS)."""

    corpus: str = field(
        default="embedded:debian-english",
        metadata={
            "help": "Hub dataset id, a local file/folder/glob of .txt/.jsonl/.json/.parquet, "
            "or `embedded:debian-english`."
        },
    )
    corpus_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset config (subset) name."}
    )
    corpus_split: str = field(default="train", metadata={"help": "Split, slicing allowed (`train[:1%]`)."})
    corpus_text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    corpus_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    ctx_len: int = field(default=64, metadata={"help": "Tokens per row, including the BOS at position 0."})
    row_start: int = field(default=0, metadata={"help": "First row of the tokenized corpus to use."})
    n_rows: int = field(default=1024, metadata={"help": "Number of rows to use, from `row_start`."})
    seed: int = field(
        default=22, metadata={"help": "Seed for the document shuffle and every random choice of the stage."}
    )
    corpus_streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the corpus with `datasets` streaming: nothing downloaded or held beyond "
            "the rows used, documents in the corpus's order (not shuffled); a cache "
            "resumes from the stream position saved with each finished shard."
        },
    )

    def __post_init__(self):
        if self.corpus_streaming and "[" in self.corpus_split:
            _fail(
                "corpus_split",
                f"{self.corpus_split!r}: a streamed corpus cannot be sliced; give the split's name "
                "and choose the slice with `row_start` / `n_rows`.",
            )
        if not self.corpus:
            _fail("corpus", "is empty; give a Hub dataset id, local files, or `embedded:debian-english`.")
        from latentsim.corpus import EMBEDDED_CORPORA

        _check_embedded("corpus", self.corpus, EMBEDDED_CORPORA, "corpus")
        if self.ctx_len < 2:
            _fail("ctx_len", f"must be >= 2 (BOS + at least one token), got {self.ctx_len}.")
        if self.row_start < 0:
            _fail("row_start", f"must be >= 0, got {self.row_start}.")
        if self.n_rows < 1:
            _fail("n_rows", f"must be >= 1, got {self.n_rows}.")


@dataclass
class SAEArguments:
    """Where the SAE comes from and which residual stream it reads."""

    hookpoint: str = field(
        default="layers.15",
        metadata={"help": "Residual stream after decoder layer N, written `layers.N` (delphi's naming)."},
    )
    sae_path: str | None = field(
        default=None, metadata={"help": "Local sae-lens folder (cfg.json + sae_weights.safetensors)."}
    )
    sae_release: str | None = field(
        default=None, metadata={"help": "sae-lens pretrained release (GPU users), with `sae_id`."}
    )
    sae_id: str | None = field(default=None, metadata={"help": "SAE id inside `sae_release`."})

    def __post_init__(self):
        if not HOOKPOINT_RE.match(self.hookpoint):
            _fail(
                "hookpoint",
                f"{self.hookpoint!r} is not of the form `layers.N` (residual stream after layer N).",
            )
        if (self.sae_release is None) != (self.sae_id is None):
            _fail(
                "sae_release" if self.sae_release is None else "sae_id",
                "`sae_release` and `sae_id` go together; set both or neither.",
            )
        if self.sae_path and self.sae_release:
            _fail("sae_path", "set either `sae_path` (local folder) or `sae_release` + `sae_id`, not both.")

    @property
    def layer(self) -> int:
        return hookpoint_layer(self.hookpoint)


def hookpoint_layer(hookpoint: str) -> int:
    match = HOOKPOINT_RE.match(hookpoint)
    if not match:
        _fail("hookpoint", f"{hookpoint!r} is not of the form `layers.N`.")
    return int(match.group(1))


@dataclass
class OutputArguments:
    """The output group of every stage that skips finished work on a rerun (the cache, the SAE, the sweep,
    patching, the whole layer). A stage with a default folder redeclares `output_dir` with it."""

    output_dir: str = field(default="", metadata={"help": "Where this stage writes."})
    overwrite: bool = field(
        default=False, metadata={"help": "Redo finished work in output_dir instead of skipping it."}
    )


@dataclass
class RunArguments(OutputArguments):
    """The output group and the stage's seed (stages whose corpus brings its own seed use OutputArguments)."""

    seed: int = field(default=22, metadata={"help": "Seed for every random choice of the stage."})


@dataclass
class VLLMEngineArguments:
    """The vLLM engine's keys, one declaration for every stage that can start one (explain, score, the
    sweep)."""

    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "vLLM: GPUs per engine (1 for an 8B on one 80 GB card; a divisor of the model's "
            "attention heads)."
        },
    )
    max_model_len: int = field(
        default=4096, metadata={"help": "vLLM: the engine's context length (prompt + answer)."}
    )
    gpu_memory_utilization: float = field(
        default=0.85, metadata={"help": "vLLM: share of each GPU's memory it may take."}
    )

    def check_vllm_engine(self) -> None:
        _require_positive(self, "tensor_parallel_size", "max_model_len")
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail("gpu_memory_utilization", f"{self.gpu_memory_utilization} is not in (0, 1].")
