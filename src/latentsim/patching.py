"""Patching decoded SAE latents into the subject model and measuring how far its next-token distribution
moves.

The residual stream after decoder layer L (hookpoint `layers.L`) is replaced by a vector built from SAE
latents (the SAE's own, a fraction of them, or a simulator's), on exactly the tokens and positions of a cache
row.

- `clean_pass`: one forward that records the layer's input and output at every position and the clean logits.
- `judged_logits`: N patched versions of the *last* position only. Positions before it are unchanged by a
  patch there (causal attention), so the clean pass's KV cache of the earlier positions is reused and each
  variant costs one token through the model instead of the whole sequence.
- `all_positions_logits`: N versions with every position but BOS patched (full forwards with a hook).
- `kl_and_ce`: KL(p_clean || p_patched) (this direction everywhere: the clean model's expected extra nats when
  coding with the patched distribution) and the CE of the true next token, over the vocabulary in row chunks.
"""

from __future__ import annotations

import copy

import torch

from latentsim.models import cache_keyword
from latentsim.sae import decoder_layers


@torch.no_grad()
def clean_pass(model, ids: torch.Tensor, layer: int):
    """ids [T] -> (clean logits [T, V] fp32, layer input [T, d], layer output [T, d], KV cache of ids[:-1]).

    Two steps, T tokens in all: ids[:-1] with a cache, then the last token on it; the cache of the first step
    is kept for `judged_logits` (sliding-window caches cannot be cropped back afterwards)."""
    captured = {"in": [], "out": []}

    def hook(_module, inputs, output):
        captured["in"].append(inputs[0])
        captured["out"].append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    key = cache_keyword(model)
    try:
        first = model(input_ids=ids[None, :-1], use_cache=True)
        prefix_cache = first.cache if "cache" in first else first.past_key_values
        kept = copy.deepcopy(prefix_cache)
        last = model(
            input_ids=ids[None, -1:],
            position_ids=torch.tensor([[len(ids) - 1]], device=ids.device),
            use_cache=True,
            **{key: prefix_cache},
        )
    finally:
        handle.remove()
    logits = torch.cat([first.logits[0], last.logits[0]]).float()
    return logits, torch.cat(captured["in"], dim=1)[0], torch.cat(captured["out"], dim=1)[0], kept


def _replace_output(vectors: torch.Tensor, positions: slice):
    """A forward hook that writes `vectors` [N, P, d] into the layer output at `positions` (batch N)."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, positions] = vectors.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


@torch.no_grad()
def judged_logits(model, ids: torch.Tensor, layer: int, cache, vectors: torch.Tensor) -> torch.Tensor:
    """Last-position logits [N, V] with the layer output at the last position replaced by each of `vectors`
    [N, d], reusing the clean KV cache of positions < T (`cache` from `clean_pass`, left untouched)."""
    n, t = vectors.shape[0], ids.shape[0]
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(n)
    handle = decoder_layers(model)[layer].register_forward_hook(
        _replace_output(vectors[:, None, :], slice(0, 1))
    )
    try:
        decoder_kwargs = {cache_keyword(model): past}
        out = model(
            input_ids=ids[-1:].expand(n, 1),
            position_ids=torch.full((n, 1), t - 1, device=ids.device),
            use_cache=True,
            **decoder_kwargs,
        )
    finally:
        handle.remove()
    return out.logits[:, -1].float()


@torch.no_grad()
def all_positions_logits(model, ids: torch.Tensor, layer: int, vectors: torch.Tensor) -> torch.Tensor:
    """Logits [N, T, V] with the layer output at positions 1..T-1 replaced by `vectors` [N, T-1, d] (BOS kept:
    SAEs are not trained on its massive residual)."""
    n = vectors.shape[0]
    handle = decoder_layers(model)[layer].register_forward_hook(_replace_output(vectors, slice(1, None)))
    try:
        out = model(input_ids=ids[None].expand(n, -1), use_cache=False)
    finally:
        handle.remove()
    return out.logits.float()


def kl_and_ce(
    clean_logits: torch.Tensor, patched_logits: torch.Tensor, next_ids: torch.Tensor | None, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of [..., V] logits: KL(p_clean || p_patched) in nats and (if next_ids) -log p_patched(next).
    Log-softmax over the vocabulary is done `chunk` rows at a time (Gemma's vocabulary is 262k)."""
    shape = patched_logits.shape[:-1]
    clean = clean_logits.expand_as(patched_logits).reshape(-1, patched_logits.shape[-1])
    patched = patched_logits.reshape(-1, patched_logits.shape[-1])
    nxt = next_ids.expand(shape).reshape(-1) if next_ids is not None else None
    kl, ce = [], []
    for a in range(0, patched.shape[0], chunk):
        log_p = torch.log_softmax(clean[a : a + chunk].double(), dim=-1)
        log_q = torch.log_softmax(patched[a : a + chunk].double(), dim=-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
        if nxt is not None:
            ce.append(-log_q.gather(1, nxt[a : a + chunk, None]).squeeze(1))
    return torch.cat(kl).reshape(shape), (torch.cat(ce).reshape(shape) if nxt is not None else None)


def keep_fraction(z: torch.Tensor, fraction: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    """z [..., W] with only ceil(fraction * n_active) of each row's active latents kept (with their true
    values): the strongest (`top`) or a uniformly random subset (`random`)."""
    out = torch.zeros_like(z)
    for i, row in enumerate(z.reshape(-1, z.shape[-1])):
        active = torch.nonzero(row > 0).flatten()
        n_keep = int(torch.ceil(torch.tensor(fraction * len(active))).item()) if fraction > 0 else 0
        if mode == "top":
            keep = active[torch.argsort(row[active], descending=True, stable=True)[:n_keep]]
        else:
            keep = active[torch.randperm(len(active), generator=generator)[:n_keep]]
        out.reshape(-1, z.shape[-1])[i, keep] = row[keep]
    return out


def value_from_digits(edges: torch.Tensor, expected_digit: torch.Tensor) -> torch.Tensor:
    """Map a simulator's expected 0-9 answer back to activations through each latent's deciles: digit d stands
    for the decile [edges[d], edges[d+1]] of its non-zero distribution, an exact d for its midpoint, linear
    between. edges [n, 11], expected_digit [n] in [0, 9]."""
    e = expected_digit.clamp(0, 9).to(edges.dtype) + 0.5
    lower = e.floor().long().clamp(max=9)
    frac = e - lower
    lo = edges.gather(1, lower[:, None])[:, 0]
    hi = edges.gather(1, (lower + 1)[:, None])[:, 0]
    return lo + frac * (hi - lo)
