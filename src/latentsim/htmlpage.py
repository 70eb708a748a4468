"""HTML fragments shared by the eval pages (eval/report.py, eval/generate.py): tables and KL-coloured text."""

from __future__ import annotations

import html

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;"
    "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
    "figure{display:inline-block;margin:1em}img{max-width:900px}td.text{text-align:left;font-family:monospace;"
    "white-space:pre-wrap;max-width:900px}span.tok{border-radius:2px}"
)


def table_html(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape("" if v is None else str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kl_coloured(tokens: list[str], kl: list[float], scale: float) -> str:
    """Each token on a red background whose strength is its KL(clean || patched) relative to `scale`."""
    spans = []
    for token, value in zip(tokens, kl, strict=True):
        alpha = min(1.0, value / scale) if scale > 0 else 0.0
        spans.append(
            f'<span class="tok" style="background:rgba(220,40,40,{alpha:.2f})" '
            f'title="KL {value:.4f} nats">{html.escape(token)}</span>'
        )
    return "".join(spans)


def generation_fragment(results: dict) -> str:
    """Prompts and their continuations side by side per source, tokens coloured by per-token KL."""
    scale = max([v for g in results["generations"] for v in g["kl"]] + [1e-9])
    parts = [
        f"<p>Closed-loop generation: every generated position's layer activations come from the source; "
        f"{html.escape(results['kl_direction'])} per token (darker red = larger, max {scale:.3f} nats); "
        f"recovered = share of the truly active latents the source kept.</p>"
    ]
    for prompt in results["prompts"]:
        rows = [g for g in results["generations"] if g["prompt"] == prompt]
        body = "".join(
            f"<tr><td>{html.escape(g['source'])}</td><td>{sum(g['kl']) / len(g['kl']):.4f}</td>"
            f'<td>{g["recovered"]:.2f}</td><td class="text"><b>{html.escape(prompt)}</b>'
            f"{kl_coloured(g['tokens'], g['kl'], scale)}</td></tr>"
            for g in rows
        )
        parts.append(
            f'<table class="generation"><thead><tr><th>source</th><th>mean KL</th><th>recovered</th>'
            f"<th>text</th></tr></thead><tbody>{body}</tbody></table>"
        )
    return "".join(parts)
