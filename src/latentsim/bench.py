"""Benchmarks: each variant against the naive way in one run, interleaved, with an exactness check.

Timings swing +-30% between runs on a shared VM, so only ratios measured in the same run are reported, next to
achieved GFLOP/s and its share of a matmul calibration taken in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    """fp32 GEMM throughput of this machine right now (the roofline the benchmarks quote)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def non_embedding_parameters(model) -> int:
    """N of the FLOP bounds: parameters outside the token embedding and the output layer."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def speed_fields(gflops: float, calibration: float, times: dict[str, list[float]], repeats: int) -> dict:
    """The fields every benchmark reports beside its ratio: achieved GFLOP/s against the same run's matmul
    calibration, and the raw timings."""
    return {
        "achieved_gflops": gflops,
        "matmul_calibration_gflops": calibration,
        "pct_of_matmul": 100 * gflops / calibration,
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "repeats": repeats,
    }


def interleaved_timings(
    variants: dict[str, Callable[[], object]], repeats: int = 3
) -> dict[str, list[float]]:
    """Run each variant `repeats` times, round-robin (so drift hits all equally), after one warm-up each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _sorted(locations: np.ndarray, activations: np.ndarray):
    order = np.lexsort((locations[:, 2], locations[:, 1], locations[:, 0]))
    return locations[order], activations[order]


def bench_cache(
    model,
    sae,
    rows: torch.Tensor,
    layer: int,
    batch_size: int,
    repeats: int = 3,
    calibration_gflops: float | None = None,
) -> dict:
    """Caching: stop at the hook + sparse TopK (ours) vs full forward with logits + dense latents +
    nonzero."""
    from latentsim.cache import record_rows

    outputs = {}
    variants = {
        "naive": lambda: outputs.__setitem__(
            "naive", record_rows(model, sae, rows, layer, batch_size, naive=True)
        ),
        "ours": lambda: outputs.__setitem__("ours", record_rows(model, sae, rows, layer, batch_size)),
    }
    times = interleaved_timings(variants, repeats)
    (n_loc, n_act), (o_loc, o_act) = _sorted(*outputs["naive"]), _sorted(*outputs["ours"])
    same_set = n_loc.shape == o_loc.shape and bool(np.array_equal(n_loc, o_loc))
    # Both store float16; the check is that the values agree to fp16 rounding.
    same_values = same_set and bool(np.array_equal(n_act.astype(np.float16), o_act.astype(np.float16)))
    naive_s, ours_s = statistics.median(times["naive"]), statistics.median(times["ours"])
    tokens = rows.numel()
    # Useful work of the fast path: the layers up to the hook (2 FLOPs per weight per token) + the SAE
    # encoder.
    from latentsim.sae import decoder_layers

    layers = decoder_layers(model)
    encoder = 2 * sae.cfg.d_in * sae.cfg.d_sae
    per_token = 2 * sum(p.numel() for p in layers[: layer + 1].parameters()) + encoder
    # The naive way also runs the remaining layers and the lm_head: the speed-up can not exceed this ratio.
    naive_per_token = (
        2 * sum(p.numel() for p in layers.parameters())
        + 2 * model.get_output_embeddings().weight.numel()
        + encoder
    )
    gflops = per_token * tokens / ours_s / 1e9
    calibration = calibration_gflops or matmul_gflops()
    return {
        "name": "cache_activations",
        "ratio_vs_naive": naive_s / ours_s,
        "tokens_per_s": {"naive": tokens / naive_s, "ours": tokens / ours_s},
        "flop_ratio_bound": naive_per_token / per_token,
        "pct_of_flop_bound": 100 * (naive_s / ours_s) / (naive_per_token / per_token),
        "exact": same_set and same_values,
        "exactness_check": "identical (row, position, latent) sets and values equal after fp16 rounding",
        "n_nonzero": int(len(o_act)),
        "tokens": tokens,
        **speed_fields(gflops, calibration, times, repeats),
    }


def bench_sft(
    model_path: str,
    seq_len: int = 128,
    batch_size: int = 4,
    repeats: int = 3,
    lora_r: int = 16,
    calibration_gflops: float | None = None,
    seed: int = 0,
) -> dict:
    """One optimizer step of full finetuning vs LoRA (all linear layers) on random tokens, fp32.

    FLOP bounds per token: full 6N (forward 2N + input grads 2N + weight grads 2N), LoRA 4N (no weight grads
    for the frozen weights), N = non-embedding parameters. Exactness: at initialisation LoRA's B is zero, so
    both variants must give the same first loss.
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    vocab = base.config.get_text_config().vocab_size
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    n_nonembed = non_embedding_parameters(base)

    full = copy.deepcopy(base).train()
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    ).train()
    optimizers = {
        "full": torch.optim.AdamW(full.parameters(), lr=1e-5),
        "lora": torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5),
    }
    models = {"full": full, "lora": lora}
    first_loss = {}

    def step(name):
        loss = models[name](input_ids=batch, labels=batch).loss
        first_loss.setdefault(name, float(loss))
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times = interleaved_timings({"full": lambda: step("full"), "lora": lambda: step("lora")}, repeats)
    tokens = batch.numel()
    tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}
    calibration = calibration_gflops or matmul_gflops()
    bound = {"full": 6 * n_nonembed, "lora": 4 * n_nonembed}
    gflops = {k: bound[k] * tok_s[k] / 1e9 for k in tok_s}
    return {
        "name": f"sft_step[{Path(model_path).name}, {batch_size}x{seq_len} tokens, LoRA r={lora_r}]",
        "ratio_vs_naive": tok_s["lora"] / tok_s["full"],
        "naive": "full finetuning (AdamW on every weight)",
        "tokens_per_s": tok_s,
        "flop_bound_per_token": {"full": "6N", "lora": "4N", "N_nonembedding": n_nonembed},
        "achieved_gflops": gflops["lora"],
        "achieved_gflops_full": gflops["full"],
        "matmul_calibration_gflops": calibration,
        "pct_of_matmul": 100 * gflops["lora"] / calibration,
        "pct_of_matmul_full": 100 * gflops["full"] / calibration,
        "exact": abs(first_loss["full"] - first_loss["lora"]) < 1e-5,
        "exactness_check": "at init (LoRA B = 0) full and LoRA give the same first loss (|diff| < 1e-5)",
        "first_loss": first_loss,
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "repeats": repeats,
    }


def bench_scoring(
    model,
    tokenizer,
    judgments: list,
    answer_ids: list[int],
    batch_size: int = 16,
    repeats: int = 3,
    calibration_gflops: float | None = None,
) -> dict:
    """Simulator judgments/s (sim_v1 `Judgment`s): the eval's prefix-shared scorer vs the naive way (one full
    prompt per judgment, left-padded batches, logits at every position) and naive + `logits_to_keep=1`, on the
    same token ids.

    Exactness: |delta (logit(yes) - logit(no))| of the prefix-shared scorer vs the naive forward < 1e-4
    (fp32). Achieved GFLOP/s counts 2 N_nonembedding FLOPs per token actually computed (the prefix once per
    context).
    """
    from latentsim.prompts import prompt_token_ids
    from latentsim.simulators import scorer_for_model
    from latentsim.simulators.hf import naive_label_logits

    outputs, scorer = {}, scorer_for_model(model, tokenizer, "sim_v1", answer_ids, batch_size)
    prompts = [scorer.prompt(j) for j in judgments]
    variants = {
        "naive": lambda: outputs.__setitem__(
            "naive", naive_label_logits(model, tokenizer, prompts, answer_ids, batch_size)
        ),
        "naive_last_logits": lambda: outputs.__setitem__(
            "naive_last_logits",
            naive_label_logits(model, tokenizer, prompts, answer_ids, batch_size, full_logits=False),
        ),
        "prefix_shared": lambda: outputs.__setitem__("prefix_shared", scorer.label_logits(judgments)),
    }
    times = interleaved_timings(variants, repeats)
    per_s = {k: len(prompts) / statistics.median(v) for k, v in times.items()}
    margin = {k: v[:, 1] - v[:, 0] for k, v in outputs.items()}
    max_diff = float(np.abs(margin["prefix_shared"] - margin["naive"]).max())
    prompt_tokens = sum(len(prompt_token_ids(tokenizer, p)) for p in prompts)
    runs = repeats + 1
    computed = scorer.stats["computed_tokens"] / runs  # per pass over the prompts (suffix padding included)
    n_nonembed = non_embedding_parameters(model)
    calibration = calibration_gflops or matmul_gflops()
    gflops = 2 * n_nonembed * computed * per_s["prefix_shared"] / len(prompts) / 1e9
    return {
        "name": f"score_simulator[{len(prompts)} judgments, {len({j.context for j in judgments})} contexts]",
        "ratio_vs_naive": per_s["prefix_shared"] / per_s["naive"],
        "ratio_naive_last_logits_vs_naive": per_s["naive_last_logits"] / per_s["naive"],
        "naive": "one full prompt per judgment, left-padded batches, logits at every position",
        "judgments_per_s": per_s,
        "mean_prompt_tokens": prompt_tokens / len(prompts),
        "mean_computed_tokens_per_judgment": computed / len(prompts),
        "flop_ratio_bound": prompt_tokens / computed,
        "exact": max_diff < 1e-4,
        "exactness_check": "|delta(logit_yes - logit_no)| prefix-shared vs naive < 1e-4 (fp32)",
        "max_abs_diff_margin": max_diff,
        **speed_fields(gflops, calibration, times, repeats),
    }


def bench_patch_kl(
    model,
    sae,
    rows: torch.Tensor,
    layer: int,
    n_variants: int = 8,
    repeats: int = 3,
    calibration_gflops: float | None = None,
) -> dict:
    """KL(clean || patched) of N latent variants patched at each row's last position: ours (one clean pass
    whose KV cache of the earlier positions is reused, N one-token suffixes, KL in row chunks) vs the naive
    way (per variant a clean and a patched full forward, full-sequence logits, dense decode). Exactness: same
    KL (1e-5)."""
    from latentsim.patching import clean_pass, judged_logits, keep_fraction, kl_and_ce
    from latentsim.sae import decoder_layers

    gen = torch.Generator().manual_seed(0)
    fractions = [i / max(n_variants - 1, 1) for i in range(n_variants)]

    def variants(x_last):
        z = sae.encode(x_last[None])
        return torch.cat([sae.decode(keep_fraction(z, f, "top", gen)) for f in fractions])

    def ours():
        out = []
        for ids in rows:
            logits, _, x_out, kv = clean_pass(model, ids, layer)
            out.append(
                kl_and_ce(logits[-1], judged_logits(model, ids, layer, kv, variants(x_out[-1])), None)[0]
            )
        return torch.stack(out)

    def naive():
        out = []
        for ids in rows:
            row = []
            for i in range(n_variants):
                x = {}
                grab = decoder_layers(model)[layer].register_forward_hook(
                    lambda _m, _i, o, x=x: x.__setitem__("out", (o[0] if isinstance(o, tuple) else o)[0])
                )
                clean = model(input_ids=ids[None], use_cache=False).logits[0].float()
                grab.remove()
                vector = variants(x["out"][-1])[i]

                def patch(_m, _i, o, vector=vector):
                    h = (o[0] if isinstance(o, tuple) else o).clone()
                    h[0, -1] = vector
                    return (h, *o[1:]) if isinstance(o, tuple) else h

                handle = decoder_layers(model)[layer].register_forward_hook(patch)
                patched = model(input_ids=ids[None], use_cache=False).logits[0].float()
                handle.remove()
                log_p, log_q = (
                    torch.log_softmax(clean[-1].double(), -1),
                    torch.log_softmax(patched[-1].double(), -1),
                )
                row.append((log_p.exp() * (log_p - log_q)).sum())
            out.append(torch.stack(row))
        return torch.stack(out)

    outputs = {}
    with torch.no_grad():
        times = interleaved_timings(
            {
                "naive": lambda: outputs.__setitem__("naive", naive()),
                "ours": lambda: outputs.__setitem__("ours", ours()),
            },
            repeats,
        )
    # Same random fractions in both: `top` fractions do not draw from the generator.
    max_diff = float((outputs["ours"] - outputs["naive"]).abs().max())
    n = rows.shape[0] * n_variants
    per_s = {k: n / statistics.median(v) for k, v in times.items()}
    t = rows.shape[1]
    n_nonembed = non_embedding_parameters(model)
    calibration = calibration_gflops or matmul_gflops()
    gflops = 2 * n_nonembed * (t + n_variants) * rows.shape[0] * per_s["ours"] / n / 1e9
    return {
        "name": f"patch_kl[{rows.shape[0]} contexts x {t} tokens, "
        f"{n_variants} variants at the judged position]",
        "ratio_vs_naive": per_s["ours"] / per_s["naive"],
        "naive": "per variant: a clean and a patched full forward, full-sequence logits, dense decode",
        "variants_per_s": per_s,
        "flop_ratio_bound": (2 * t * n_variants) / (t + n_variants),
        "exact": max_diff < 1e-5,
        "exactness_check": "KL(clean || patched) of every variant equal to the naive full forwards "
        "(< 1e-5 nats)",
        "max_abs_diff_kl": max_diff,
        **speed_fields(gflops, calibration, times, repeats),
    }


def bench_dense_scoring(
    model,
    tokenizer,
    interpretations: list[str],
    text: str,
    token_ends: list[int],
    sim_v1_positions: list[int],
    batch_size: int = 64,
    repeats: int = 2,
    calibration_gflops: float | None = None,
) -> dict:
    """Whole-layer judging: every latent at every token of a text. The dense format with each interpretation's
    KV reused (`DenseScorer.text_logits`) vs today's prefix-shared sim_v1 scoring and vs the naive dense way
    (one forward per judgment: header + text up to the judged token), on the same (latent, token) pairs.

    The dense scorer judges all latents x all tokens; the per-judgment variants judge all latents at the
    tokens `sim_v1_positions` (their cost per judgment does not depend on how many positions: each position is
    its own context). Ratios are judgments/s. Exactness: the dense scores equal the naive per-position
    forwards (|delta (logit yes - logit no)| < 1e-4, fp32) on every pair both judged."""
    from latentsim.prompts import answer_token_ids, marked_context
    from latentsim.simulators import Judgment, scorer_for_model
    from latentsim.simulators.hf import naive_dense_logits

    dense_ids, sim_ids = answer_token_ids("sim_dense_v1", tokenizer), answer_token_ids("sim_v1", tokenizer)
    value_ids = answer_token_ids("sim_dense_value_v1", tokenizer)
    starts = [0] + token_ends[:-1]
    judgments = [
        Judgment(marked_context(text[: starts[t]], text[starts[t] : token_ends[t]]), i)
        for t in sim_v1_positions
        for i in interpretations
    ]
    dense = scorer_for_model(model, tokenizer, "sim_dense_v1", dense_ids, batch_size)
    naive = scorer_for_model(
        model, tokenizer, "sim_dense_v1", dense_ids, batch_size
    )  # a forward per judgment
    sim_v1 = scorer_for_model(model, tokenizer, "sim_v1", sim_ids, batch_size)
    value = scorer_for_model(model, tokenizer, "sim_dense_value_v1", value_ids, batch_size)
    outputs = {}
    variants = {
        "dense_kv_shared": lambda: outputs.__setitem__(
            "dense_kv_shared", dense.text_logits(interpretations, [(text, token_ends)])[0]
        ),
        "dense_value_kv_shared": lambda: outputs.__setitem__(
            "dense_value_kv_shared", value.text_logits(interpretations, [(text, token_ends)], bins=True)[0]
        ),
        "dense_per_position": lambda: outputs.__setitem__(
            "dense_per_position", naive.label_logits(judgments)
        ),
        "sim_v1_prefix_shared": lambda: outputs.__setitem__(
            "sim_v1_prefix_shared", sim_v1.label_logits(judgments)
        ),
    }
    times = interleaved_timings(variants, repeats)
    n_all, n_sub = len(interpretations) * len(token_ends), len(judgments)
    per_s = {
        "dense_kv_shared": n_all / statistics.median(times["dense_kv_shared"]),
        "dense_value_kv_shared": n_all / statistics.median(times["dense_value_kv_shared"]),
        "dense_per_position": n_sub / statistics.median(times["dense_per_position"]),
        "sim_v1_prefix_shared": n_sub / statistics.median(times["sim_v1_prefix_shared"]),
    }
    kv = outputs["dense_kv_shared"][:, sim_v1_positions]  # [latents, positions, 2]
    kv_margin = (kv[..., 1] - kv[..., 0]).T.reshape(-1)  # position-major, like the judgments
    naive_out = outputs["dense_per_position"]
    max_diff = float(np.abs(kv_margin - (naive_out[:, 1] - naive_out[:, 0])).max())
    # The value format's 11 answer rows at every token equal one full forward per latent.
    value_diff = max(
        float(
            np.nanmax(
                np.abs(
                    outputs["dense_value_kv_shared"][i]
                    - naive_dense_logits(
                        model,
                        tokenizer,
                        "sim_dense_value_v1",
                        interpretations[i],
                        text,
                        token_ends,
                        value_ids,
                    )
                )
            )
        )
        for i in range(min(4, len(interpretations)))
    )
    runs = repeats + 1
    computed = {
        "dense_kv_shared": dense.stats["computed_tokens"] / runs / n_all,
        "dense_value_kv_shared": value.stats["computed_tokens"] / runs / n_all,
        "dense_per_position": naive.stats["computed_tokens"] / runs / n_sub,
        "sim_v1_prefix_shared": sim_v1.stats["computed_tokens"] / runs / n_sub,
    }
    n_nonembed = non_embedding_parameters(model)
    calibration = calibration_gflops or matmul_gflops()
    gflops = 2 * n_nonembed * computed["dense_kv_shared"] * per_s["dense_kv_shared"] / 1e9
    return {
        "name": f"score_whole_layer[{len(interpretations)} latents x {len(token_ends)} tokens of one text]",
        "ratio_vs_naive": per_s["dense_kv_shared"] / per_s["dense_per_position"],
        "ratio_vs_sim_v1_prefix_shared": per_s["dense_kv_shared"] / per_s["sim_v1_prefix_shared"],
        # The value format (sim_dense_value_v1): the same pass, 11 answer rows instead of 2.
        "ratio_value_vs_binary_dense": per_s["dense_value_kv_shared"] / per_s["dense_kv_shared"],
        "value_exact": value_diff < 1e-4,
        "value_max_abs_diff_logits": value_diff,
        "naive": "the dense format read one judgment per forward (header + text up to the judged token)",
        "judgments_per_s": per_s,
        "computed_tokens_per_judgment": computed,
        "exact": max_diff < 1e-4,
        "exactness_check": "|delta(logit_yes - logit_no)| KV-shared dense vs one forward per judgment "
        f"< 1e-4 (fp32), on {n_sub} pairs",
        "max_abs_diff_margin": max_diff,
        **speed_fields(gflops, calibration, times, repeats),
    }


def whole_layer_inputs(eval_set: Path, tokenizer, n_latents: int, n_tokens: int, words: list[str]):
    """bench_dense_scoring's inputs: interpretations of one dense header length (the quickstart eval set's
    when it exists, else token-list-like ones from `words`) and the first `n_tokens` tokens of the words
    joined, with each token's character end."""
    import random

    from latentsim.prompts import dense_header_ids

    if (eval_set / "test.parquet").is_file():
        import pandas as pd

        interpretations = (
            pd.read_parquet(eval_set / "test.parquet")["interpretation"].drop_duplicates().tolist()
        )
    else:
        rng = random.Random(0)
        interpretations = [
            ", ".join(f'"{w.strip(".,")}"' for w in rng.sample(words, rng.randint(3, 12)))
            for _ in range(2048)
        ]
    by_length = {}
    for i in interpretations:
        by_length.setdefault(len(dense_header_ids(tokenizer, "sim_dense_v1", i)), []).append(i)
    chosen = max(by_length.values(), key=len)[:n_latents]
    encoded = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in encoded["offset_mapping"][:n_tokens]]
    return chosen, " ".join(words)[: ends[-1]], ends


def random_topk_sae(d_in: int, d_sae: int, k: int):
    """A sae-lens TopK SAE with random weights (speed and exactness do not depend on what an SAE learned)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name="random")))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / d_in**0.5)
    return sae.eval()


TEXT = (
    "The standard library offers a wide range of facilities. It contains built-in modules that provide "
    "access to system functionality such as file input and output, as well as modules written in Python that "
    "provide standardized solutions for many problems that occur in everyday programming. A fool and his "
    "money are soon parted, but a wise man keeps a little of both for the days when the rain will not stop "
    "falling."
).split()


def scoring_judgments(eval_set: Path, n_contexts: int, per_context: int) -> list:
    """The quickstart eval set's judgments when it exists (its first contexts), else synthetic ones of the
    same shape: 32-word contexts, token-list-like interpretations of 3-12 words."""
    import random

    from latentsim.prompts import marked_context
    from latentsim.simulators import Judgment, judgments_of

    if (eval_set / "test.parquet").is_file():
        import pandas as pd

        df = pd.read_parquet(eval_set / "test.parquet")
        df = df[df["context"].isin(df["context"].drop_duplicates().iloc[:n_contexts])]
        return judgments_of(df.groupby("context").head(per_context))[0]
    rng = random.Random(0)
    judgments = []
    for c in range(n_contexts):
        words = TEXT[c * 7 : c * 7 + 32]
        context = marked_context(" ".join(words[:-1]) + " ", words[-1])
        for _ in range(per_context):
            interp = ", ".join(f'"{w.strip(".,")}"' for w in rng.sample(TEXT, rng.randint(3, 12)))
            judgments.append(Judgment(context, interp))
    return judgments


def dictionary_of(interpretations: list[str], size: int) -> list[str]:
    """`size` interpretations: the real ones, then numbered copies of them (timing only: a pass costs what its
    header's length costs, whatever it says)."""
    n = len(interpretations)
    return [interpretations[i % n] + ("" if i < n else f" ({i // n})") for i in range(size)]


def bench_two_stage(
    model,
    tokenizer,
    interpretations: list[str],
    text: str,
    token_ends: list[int],
    sizes: list[int],
    k: int,
    sample_latents: int,
    rank: int = 64,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """Seconds per text of the whole layer judged both ways, per dictionary size (latentsim.first_stage).

    Measured at each size: the first stage (one pass over the text, then its scores against every latent and
    the top-k; random head and interpretation vectors: its cost does not depend on their values) and the dense
    judge on a seeded sample of `sample_latents` of the latents the first stage proposes, judging every token
    (one way) and only their proposed tokens (the other). Judging every latent is one pass per latent, so its
    time is the sample's x size / sample; the two-stage judge's is the sample's x proposed latents / sample.
    Interpretation vectors (once per dictionary) are timed on the sample's headers, per header. A random head
    proposes the same latents at many tokens (its token side varies little along a text), so its proposed
    latents are fewer than a trained first stage's may be: `two_stage_at_most` also bounds the two-stage time
    as if every one of the k x tokens proposals were another latent judged over the whole text. Exactness:
    the two-stage verdicts equal judging everything on every proposed pair of the sample (< 1e-4)."""
    from latentsim import first_stage
    from latentsim.prompts import answer_token_ids, dense_header_ids
    from latentsim.simulators import scorer_for_model

    scorer = scorer_for_model(model, tokenizer, "sim_dense_v1", answer_token_ids("sim_dense_v1", tokenizer))
    scorer.batch_size = batch_size
    encoder = first_stage.Encoder(model, tokenizer, "sim_dense_v1", batch_size=batch_size)
    d = model.config.get_text_config().hidden_size
    gen = torch.Generator().manual_seed(seed)
    head = first_stage.BilinearHead(d, d, rank).eval()
    rng = np.random.default_rng(seed)
    texts = [(text, token_ends)]
    out = []
    for size in sizes:
        dictionary = dictionary_of(interpretations, size)
        side = torch.randn(size, rank, generator=gen)
        start = time.perf_counter()
        vectors, aligned = encoder.token_vectors(texts)[0]
        scores = first_stage.text_scores(head, vectors, side, np.zeros(size, dtype=np.float32))
        proposed = first_stage.top_k(scores, k, aligned)  # [tokens, size]
        first_seconds = time.perf_counter() - start
        candidates = np.nonzero(proposed.any(axis=0))[0]
        sample = np.sort(rng.choice(candidates, min(sample_latents, len(candidates)), replace=False))
        listed = [dictionary[i] for i in sample]
        before = scorer.stats["computed_tokens"]
        start = time.perf_counter()
        full = scorer.text_logits(listed, texts)[0]
        all_seconds = time.perf_counter() - start
        full_computed = scorer.stats["computed_tokens"] - before
        before = scorer.stats["computed_tokens"]
        start = time.perf_counter()
        two = scorer.text_logits(listed, texts, proposed=[proposed[:, sample].T])[0]
        judge_seconds = time.perf_counter() - start
        computed = scorer.stats["computed_tokens"] - before
        start = time.perf_counter()
        encoder.interpretation_vectors(listed)
        header_seconds = (time.perf_counter() - start) / len(sample)
        wanted = proposed[:, sample].T & np.isfinite(full[..., 0])
        max_diff = float(np.abs(two[wanted] - full[wanted]).max()) if wanted.any() else 0.0
        judge_all = all_seconds * size / len(sample)
        judge_two = judge_seconds * len(candidates) / len(sample)
        judge_most = all_seconds * min(size, k * int(aligned.sum())) / len(sample)
        n_tokens = int(aligned.sum())
        out.append(
            {
                "name": f"two_stage_whole_layer[{size} latents x {len(token_ends)} tokens, k = {k}]",
                "latents": size,
                "k": k,
                "seconds_per_text": {
                    "judge_every_latent": judge_all,
                    "two_stage": first_seconds + judge_two,
                    "first_stage": first_seconds,
                    "two_stage_judge": judge_two,
                    "two_stage_at_most": first_seconds + judge_most,
                },
                "ratio_vs_naive": judge_all / (first_seconds + judge_two),
                "ratio_vs_naive_at_least": judge_all / (first_seconds + judge_most),
                "naive": "the dense simulator judging every latent at every token (one pass per latent)",
                "first_stage_share": first_seconds / (first_seconds + judge_two),
                "judgments": {"every_latent": size * n_tokens, "two_stage": int(proposed.sum())},
                "proposed_latents": int(len(candidates)),
                "sampled_latents": int(len(sample)),
                # tokens through the model per latent (its header + the text, cut short in two stages)
                "every_latent_computed_tokens_per_latent": full_computed / len(sample),
                "two_stage_computed_tokens_per_proposed_latent": computed / len(sample),
                "first_stage_computed_tokens": len(first_stage.leading_ids(tokenizer)) + n_tokens,
                "header_tokens_per_latent": float(
                    np.mean([len(dense_header_ids(tokenizer, "sim_dense_v1", x)) for x in listed])
                ),
                "interpretation_vectors_seconds_per_dictionary": header_seconds * size,
                "extrapolated": "judging every latent: sample x latents / sample; the two-stage judge: "
                "sample x proposed latents / sample; interpretation vectors: per header x latents",
                "exact": max_diff < 1e-4,
                "exactness_check": "two-stage verdicts vs judging everything on every proposed pair of the "
                f"sample, |delta logit| < 1e-4 (fp32): max {max_diff:.1e}",
            }
        )
    return out


def two_stage_cost_model(
    latents: int, parameters: float, tflops: float, tokens: int, k: int, measured: dict
) -> dict:
    """FLOPs and seconds per text at full use for `latents` latents and a simulator of `parameters`
    non-embedding parameters at `tflops` TFLOP/s, from the `measured` (bench_two_stage) tokens per latent
    (every latent: its header + the text; two stages: the text cut after its last proposed token) and
    proposals as diverse as top-k allows (`tokens` x `k` latents): FLOPs = 2 x parameters x tokens."""
    n, flop = latents, 2 * parameters
    proposed = min(n, tokens * k)
    every = flop * n * measured["every_latent_computed_tokens_per_latent"]
    first = flop * measured["first_stage_computed_tokens"]
    judge = flop * proposed * measured["two_stage_computed_tokens_per_proposed_latent"]
    seconds = {k: v / (tflops * 1e12) for k, v in {"every": every, "first": first, "judge": judge}.items()}
    return {
        "latents": n,
        "non_embedding_parameters": parameters,
        "tflops_at_full_use": tflops,
        "proposed_latents_per_text": proposed,
        "flop_per_text": {"judge_every_latent": every, "first_stage": first, "two_stage_judge": judge},
        "seconds_per_text": {
            "judge_every_latent": seconds["every"],
            "two_stage": seconds["first"] + seconds["judge"],
        },
        "ratio": every / (first + judge),
        "interpretation_vectors_flop_per_dictionary": flop * n * measured["header_tokens_per_latent"],
        "from": measured["name"],
    }
