"""Closed-loop generation with the subject model's hook layer rewritten from SAE latents or a simulator.

    python eval/generate.py --config configs/eval/generate_quickstart.yaml [--key value ...]

The subject model reads each prompt clean; from its last token on, every position's residual stream after the
hook layer is replaced by a vector decoded from latents of the source, and the model continues from its own
patched predictions (greedy, or seeded sampling). Sources: `clean`, `sae` (the SAE reconstruction),
`fraction:<top|random>:<f>` (a fraction of the truly active latents, true values) and `simulator`: at every
step the simulator judges, from the text so far, each explained latent that is truly active plus `n_inactive`
random explained inactive ones; the latents it calls active (false positives included) replace the explained
active latents (values: `oracle` or `median`, as in eval/patch_kl.py); unexplained latents keep their SAE
values, and so do a finetuned simulator's training latents (it judges held-out latents only). A clean copy of
the model follows the same tokens, so each generated token has KL(p_clean || p_patched) of its prediction.
Writes results.json and generation.html to `output_dir`.
"""

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsim.cli import run
from latentsim.config import GenerateArguments
from latentsim.eval_set import EvalSet
from latentsim.generation import generate, make_sources
from latentsim.htmlpage import STYLE, generation_fragment
from latentsim.io import atomic_write_text, write_results, write_run_config
from latentsim.models import load_model_and_tokenizer

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (GenerateArguments,)


def main(args: GenerateArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "generate", {"generate": args}, args.seed)
    model, tok = load_model_and_tokenizer(eval_set.subject_model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    sae = eval_set.load_sae(device)
    medians = eval_set.decile_edges(device)[:, 5]
    sources = make_sources(args, eval_set.interpretations(), medians, tok)
    generations = []
    for prompt in args.prompts:
        prompt_ids = tok(prompt)["input_ids"]
        if tok.bos_token_id is not None and prompt_ids[:1] != [tok.bos_token_id]:
            prompt_ids = [tok.bos_token_id] + prompt_ids  # the cache's rows start with BOS too
        for name, source in tqdm(sources.items(), desc=f"generating from {prompt!r}", unit="source"):
            sampler = torch.Generator().manual_seed(args.seed) if args.do_sample else None
            new, kls, recovered = generate(
                model, eval_set.layer, sae, prompt_ids, source, args.max_new_tokens, sampler
            )
            generations.append(
                {
                    "prompt": prompt,
                    "source": name,
                    "token_ids": new,
                    "kl": kls,
                    "recovered": recovered,
                    "tokens": [tok.decode([t]) for t in new],
                    "text": tok.decode(new),
                }
            )
    result = {
        "eval_set": str(eval_set.path),
        "hookpoint": eval_set.hookpoint,
        "prompts": args.prompts,
        "kl_direction": "KL(p_clean || p_patched), nats",
        "sampling": "seeded" if args.do_sample else "greedy",
        "generations": generations,
    }
    write_results(out, result, "generation")
    atomic_write_text(
        out / "generation.html",
        f'<!doctype html><html><head><meta charset="utf-8"><title>latentsim '
        f"generation</title><style>{STYLE}</style></head><body><h1>Generation with {eval_set.hookpoint} "
        f"rewritten</h1>{generation_fragment(result)}</body></html>",
    )
    for g in generations:
        print(
            f"[generate] {g['source']:<48} mean KL {np.mean(g['kl']):.3f}  recovered {g['recovered']:.2f}  "
            f"{g['prompt']!r} -> {g['text']!r}"
        )
    print(f"[generate] {out / 'generation.html'}")
    return result


if __name__ == "__main__":
    run(main, DATACLASSES)
