"""SAEs (through sae-lens) and the residual stream they read.

`layers.N` is the residual stream after decoder layer N: the output of `model.model.layers[N]`, read with a
forward hook. `residual_at(..., stop=True)` raises inside the hook so no later layer and no logits are
computed. Position 0 (BOS) carries a residual norm ~100x the rest and ruins SAE statistics, so it is never
used for SAE training, never cached and never counted in statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from latentsim.config import hookpoint_layer
from latentsim.errors import BadInputError, ConfigError, MissingInputError

ACTIVE_THRESHOLD = 1e-5  # delphi's: a latent is active where |a| > 1e-5


class _StopForward(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list of a causal LM (Llama, Gemma 2/3, Mistral, Qwen, GPT-NeoX, GPT-2 layouts)."""
    for path in ("model.layers", "model.language_model.layers", "gpt_neox.layers", "transformer.h"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise BadInputError(f"cannot find the decoder layers of {type(model).__name__}; expected `model.layers`.")


def check_hookpoint(model, hookpoint: str) -> int:
    layer = hookpoint_layer(hookpoint)
    n_layers = len(decoder_layers(model))
    if layer >= n_layers:
        raise ConfigError(
            f"config key `hookpoint`: {hookpoint!r} but the model has only {n_layers} layers "
            f"(layers.0 .. layers.{n_layers - 1})."
        )
    return layer


@torch.no_grad()
def residual_at(
    model, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None, stop: bool = True
) -> torch.Tensor:
    """Residual stream after decoder layer `layer`, [batch, seq, d_model]. With `stop`, later layers never
    run."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


# -------------------------------------------------------------------------------------------- loading
def load_sae(sae_args, device: torch.device | str = "cpu", d_model: int | None = None):
    """Load the SAE named by `SAEArguments`: a local sae-lens folder or a pretrained (release, sae_id)."""
    from sae_lens import SAE

    if sae_args.sae_path:
        path = Path(sae_args.sae_path)
        if not (path / "cfg.json").is_file():
            raise MissingInputError(
                f"config key `sae_path`: {path} is not a sae-lens folder (no cfg.json). "
                "Train one with data_gen/train_sae.py or point to an existing folder."
            )
        sae = SAE.load_from_disk(str(path), device=str(device))
    elif sae_args.sae_release:
        sae = SAE.from_pretrained(sae_args.sae_release, sae_args.sae_id, device=str(device))
    else:
        raise ConfigError("no SAE given: set `sae_path` (local folder) or `sae_release` + `sae_id`.")
    sae.eval().requires_grad_(False)
    if d_model is not None and sae.cfg.d_in != d_model:
        raise BadInputError(
            f"the SAE reads d_in={sae.cfg.d_in} but the model's residual stream has d_model={d_model}; "
            "the SAE belongs to another model."
        )
    hook_name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None) or ""
    match = re.search(r"(?:blocks|layers)\.(\d+)", hook_name)
    if match and int(match.group(1)) != hookpoint_layer(sae_args.hookpoint):
        raise BadInputError(
            f"config key `hookpoint`: {sae_args.hookpoint!r} but the SAE was trained on {hook_name!r}."
        )
    return sae


def is_topk(sae) -> bool:
    from sae_lens.saes.topk_sae import TopK

    return isinstance(getattr(sae, "activation_fn", None), TopK)


@torch.no_grad()
def encode_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode x [n, d_in] without materialising dense latents where the SAE allows it.

    Returns (token index, latent index, value), sorted by token then latent, for |value| > ACTIVE_THRESHOLD.
    TopK SAEs keep only k values per token; other architectures fall back to dense encode + nonzero.
    """
    if is_topk(sae):
        # Same arithmetic as sae-lens' TopKSAE.encode, minus the dense scatter.
        hidden_pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
        values, latents = torch.topk(hidden_pre, k=sae.activation_fn.k, dim=-1, sorted=False)
        values = values.relu()
        tokens = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(latents)
        keep = values.abs() > ACTIVE_THRESHOLD
        tokens, latents, values = tokens[keep], latents[keep], values[keep]
        order = torch.argsort(tokens * sae.cfg.d_sae + latents)
        return tokens[order], latents[order], values[order]
    return encode_dense_nonzero(sae, x)


@torch.no_grad()
def encode_dense_nonzero(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive way (delphi's): dense latents [n, d_sae], then nonzero."""
    dense = sae.encode(x)
    tokens, latents = torch.nonzero(dense.abs() > ACTIVE_THRESHOLD, as_tuple=True)
    return tokens, latents, dense[tokens, latents]


# ------------------------------------------------------------------------------------------- training
def fraction_variance_explained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - SSE / total variance (around the mean), pooled over all tokens and dimensions."""
    sse = (x - x_hat).pow(2).sum()
    sst = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(1 - sse / sst)


@torch.no_grad()
def sae_quality(sae, x: torch.Tensor, batch: int = 4096) -> dict:
    """FVE, mean L0 and dead-latent fraction of `sae` on activations x [n, d_in]."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    recon, l0 = [], 0.0
    for i in range(0, x.shape[0], batch):
        acts = sae.encode(x[i : i + batch])
        recon.append(sae.decode(acts))
        active = acts.abs() > ACTIVE_THRESHOLD
        l0 += float(active.sum())
        fired |= active.any(dim=0).cpu()
    return {
        "fve": fraction_variance_explained(x, torch.cat(recon)),
        "l0": l0 / x.shape[0],
        "dead_fraction": float(1 - fired.float().mean()),
        "n_tokens": int(x.shape[0]),
    }


def drop_norm_outliers(x: torch.Tensor, factor: float) -> tuple[torch.Tensor, int]:
    """Remove rows of x whose norm exceeds `factor` x the median norm; return (kept rows, number dropped).

    Besides position 0, a few tokens (e.g. the first token after BOS) carry massive activations; 0.1% of
    SmolLM2's tokens hold >90% of the residual variance at layer 15, and an SAE trained on them learns little
    else.
    """
    norms = x.norm(dim=-1)
    keep = norms <= factor * norms.median()
    return x[keep], int((~keep).sum())


def shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs over x in a fresh random order each epoch (sae-lens' `data_provider`)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[order[i : i + batch_size]]


def train_topk_sae(
    x: torch.Tensor,
    d_sae: int,
    k: int,
    training_tokens: int,
    batch_size: int,
    lr: float,
    lr_end_fraction: float,
    seed: int,
    hook_name: str,
    model_name: str,
):
    """Train a sae-lens TopK SAE on activations x [n, d_in] (position 0 already removed)."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    batch_size = min(batch_size, x.shape[0])
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=x.shape[1],
            d_sae=d_sae,
            k=k,
            device=str(x.device),
            normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True),
        )
    )
    steps = math.ceil(training_tokens / batch_size)

    class Trainer(SAETrainer):
        def _update_pbar(self, step_output, pbar, update_interval: int = 10):
            # sae-lens refreshes its bar every 100 steps; a CPU run has only a few hundred.
            super()._update_pbar(step_output, pbar, update_interval)

    trainer = Trainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr * lr_end_fraction,
            lr_scheduler_name="cosineannealing",
            lr_warm_up_steps=min(50, steps // 10),
            device=str(x.device),
            dead_feature_window=max(steps // 4, 1),
            feature_sampling_window=max(steps // 2, 1),
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=shuffled_batches(x, batch_size, seed),
    )
    # Scale inputs to norm sqrt(d_in) (sae-lens folds the factor back into the weights after fit), and start
    # b_dec at the data mean: from zero, a residual stream's large mean uses up most latents (FVE 0.17 vs 0.94
    # on a synthetic sparse dictionary, tests/test_sae.py).
    scaling_factor = x.shape[1] ** 0.5 / float(x.norm(dim=-1).mean())
    trainer.activation_scaler.scaling_factor = scaling_factor
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(dim=0) * scaling_factor)
    return trainer.fit()
