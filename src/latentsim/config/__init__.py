"""Config dataclasses of every stage, parsed from YAML + command line by TRL's `TrlParser` (`parse_config`).

Each stage's arguments sit in their own module (common, data_gen, train, eval); everything is re-exported
here, so entry scripts import from `latentsim.config`. Parsing is strict: an unknown key is an error naming
the key, the file and the closest valid key.
"""

from latentsim.config.bench import BenchArguments, GpuCheckArguments, ScaleArguments, TwoStageBenchArguments
from latentsim.config.common import (
    DTYPES,
    EMBEDDED_PREFIX,
    HOOKPOINT_RE,
    CorpusArguments,
    ModelArguments,
    OutputArguments,
    RunArguments,
    SAEArguments,
    VLLMEngineArguments,
    check_device,
    check_dtype,
    hookpoint_layer,
)
from latentsim.config.data_gen import (
    CacheArguments,
    DatasetArguments,
    ExplainArguments,
    ImportRecordsArguments,
    PrepareArguments,
    ScoreArguments,
    TrainSAEArguments,
)
from latentsim.config.eval import (
    BASELINE_KEYS,
    EvalArguments,
    ExternalEvalArguments,
    GenerateArguments,
    PatchArguments,
    ReportArguments,
    SummaryArguments,
    ValueEvalArguments,
    WholeLayerArguments,
    parse_baseline,
)
from latentsim.config.parser import parse_config
from latentsim.config.train import FirstStageArguments, PublishArguments, SimScriptArguments
from latentsim.errors import ConfigError

__all__ = [
    "BASELINE_KEYS",
    "BenchArguments",
    "GpuCheckArguments",
    "ScaleArguments",
    "TwoStageBenchArguments",
    "DTYPES",
    "EMBEDDED_PREFIX",
    "HOOKPOINT_RE",
    "CacheArguments",
    "ConfigError",
    "CorpusArguments",
    "DatasetArguments",
    "EvalArguments",
    "FirstStageArguments",
    "ExternalEvalArguments",
    "ValueEvalArguments",
    "ExplainArguments",
    "ImportRecordsArguments",
    "GenerateArguments",
    "ModelArguments",
    "OutputArguments",
    "RunArguments",
    "VLLMEngineArguments",
    "PatchArguments",
    "PrepareArguments",
    "PublishArguments",
    "ReportArguments",
    "SAEArguments",
    "ScoreArguments",
    "SimScriptArguments",
    "TrainSAEArguments",
    "check_device",
    "check_dtype",
    "hookpoint_layer",
    "parse_baseline",
    "parse_config",
    "SummaryArguments",
    "WholeLayerArguments",
]
