"""The models × metrics table of eval results, one way for the eval's own report and the run report.

lm-eval cells carry the delta vs the student in parentheses: the alignment tax.
"""
from __future__ import annotations

VERDICT_METHODS = ("logprobs", "text", "followup", "none")  # how a judge's verdict was read, stored per judgment


def cell(row: dict | None, baseline: dict | None = None) -> str:
    if row is None or row["value"] is None:
        return "–"
    text = f"{row['value']:.3f}" if abs(row["value"]) < 10 else f"{row['value']:.1f}"
    if row.get("ci_low") is not None:
        text += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    if baseline is not None and baseline["value"] is not None:
        text += f" ({row['value'] - baseline['value']:+.3f})"
    return text


def results_grid(rows: list[dict], names: list[str], lead: list[tuple[str, str, str]]) -> tuple[list[str], list[list]]:
    """Header and one row per model: the `lead` (title, suite, metric) columns that have results, then
    one column per lm-eval task."""
    value = {(r["model"], r["suite"], r["metric"]): r for r in rows}
    found = {key[1:] for key in value}
    columns, seen = [], set()
    for title, suite, metric in lead:  # the first title of a metric wins
        if (suite, metric) in found and (suite, metric) not in seen:
            seen.add((suite, metric))
            columns.append((title, suite, metric))
    columns += [(task, "lmeval", task) for task in sorted({r["metric"] for r in rows if r["suite"] == "lmeval"})]
    body = [[name] + [cell(value.get((name, suite, metric)),
                           value.get(("student", suite, metric)) if suite == "lmeval" and name != "student" else None)
                      for _, suite, metric in columns] for name in names]
    return ["model"] + [c[0] for c in columns], body


def verdict_summary(rows: list[dict]) -> str | None:
    """How the judge's verdicts were read, per suite and model: by log-probs / text / follow-up / not at all."""
    counts = {}
    for r in rows:
        metric = r["metric"].partition("_vs_")[0]
        if metric.startswith("verdicts_") and r["value"] is not None:
            counts.setdefault((r["suite"], r["model"]), {})[metric.removeprefix("verdicts_")] = int(r["value"])
    if not counts:
        return None
    return "Verdicts read by log-probs / text / follow-up / not at all: " + ", ".join(
        f"{suite}/{model} " + "/".join(str(c.get(method, 0)) for method in VERDICT_METHODS)
        for (suite, model), c in sorted(counts.items())) + "."
