"""One results folder per eval run: results.parquet (also the `eval_results` view), summary.json, report.md."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from ..cache.index import CacheIndex
from ..cache.schema import EVAL_RESULTS
from ..cache.shards import shard_path, write_shard
from ..core.results import cell, results_grid, verdict_summary
from ..files import atomic_text

HEADLINE = [  # (column title, suite, metric) in the comparison table
    ("MT-Bench", "mtbench", "overall"), ("MT-Bench T1", "mtbench", "turn1"), ("MT-Bench T2", "mtbench", "turn2"),
    ("AlpacaEval win %", "alpacaeval", "win_rate"), ("AlpacaEval LC %", "alpacaeval", "length_controlled_winrate"),
    ("teacher logp/token [95% CI]", "likelihood", "teacher_logp_per_token"),
    ("KL(model‖teacher)/token [95% CI]", "likelihood", "reverse_kl_per_token"),
    ("CE on teacher answers/token [95% CI]", "likelihood", "teacher_answer_ce_per_token"),
]


def results_table(run_id: str, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in EVAL_RESULTS.names} | {"run_id": run_id}
                                 for row in rows], schema=EVAL_RESULTS)


def save_results(cache: CacheIndex, run_dir: Path, run_id: str, rows: list[dict], summary: dict, report: str) -> None:
    """Write the run's files, then register results.parquet's twin in the cache so `sql` sees every run."""
    table = results_table(run_id, rows)
    write_shard(table, run_dir / "results.parquet", {"stage": "eval-results", "fingerprint": run_id, "shard": 0})
    cache.begin_stage("eval-results", run_id, {"run_dir": str(run_dir)}, 1)
    written = write_shard(table, shard_path(cache.stage_dir("eval-results", run_id), 0),
                          {"stage": "eval-results", "fingerprint": run_id, "shard": 0})
    cache.register("eval-results", run_id, 0, written)
    atomic_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_text(run_dir / "report.md", report)


def markdown_report(run_id: str, models: dict[str, str], judge: str | None, rows: list[dict]) -> str:
    """Models side by side: headline scores, win rate vs teacher, lm-eval with deltas vs the student."""
    names = list(models)
    lines = [f"# Eval {run_id}", "", f"Judge: `{judge}` (scores from different judges are not comparable)." if judge
             else "No judge used.", "", "| model | weights |", "|---|---|"]
    lines += [f"| {name} | `{ref}` |" for name, ref in models.items()]
    winrate = sorted({r["metric"] for r in rows if r["suite"] == "winrate" and r["metric"].startswith("score_vs_")})
    lead = HEADLINE + [(f"(W+0.5T)/N {m.removeprefix('score_vs_')} [95% CI]", "winrate", m) for m in winrate]
    lead += [(f"P(better) {m.removeprefix('score_vs_')} [95% CI]", "winrate", "preference" + m.removeprefix("score"))
             for m in winrate]
    header, body = results_grid(rows, names, lead)
    if len(header) > 1:
        lines += ["", "## Results", "", "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += winrate_section(rows) + likelihood_section(rows, names) + mtbench_section(rows, names)
    lines += verdict_counts(rows)
    misses = [r for r in rows if r["metric"].startswith("unparsed") and r["value"]]
    if misses:
        lines += ["", "Judge replies without a readable verdict (counted, not scored): "
                  + ", ".join(f"{r['suite']}/{r['model']} {int(r['value'])}" for r in misses) + "."]
    return "\n".join(lines) + "\n"


def winrate_section(rows: list[dict]) -> list[str]:
    found = {}
    for r in rows:
        if r["suite"] == "winrate":
            metric, _, opponent = r["metric"].partition("_vs_")
            found.setdefault((r["model"], opponent), {})[metric] = r
    if not found:
        return []
    lines = ["", "## Win rate vs teacher (both orders; disagreement is a tie)", "",
             "| model | vs | W | T | L | W/N | (W+0.5T)/N | (W−L)/N | inconsistent | unparsed | P(better) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, opponent), m in sorted(found.items()):
        count = lambda k: str(int(m[k]["value"])) if k in m and m[k]["value"] is not None else "–"
        lines.append(f"| {model} | {opponent} | {count('wins')} | {count('ties')} | {count('losses')} | "
                     f"{cell(m.get('win_rate'))} | {cell(m.get('score'))} | {cell(m.get('net'))} | "
                     f"{cell(m.get('inconsistency_rate'))} | {count('unparsed_judgments')} | {cell(m.get('preference'))} |")
    return lines


def likelihood_section(rows: list[dict], names: list[str]) -> list[str]:
    """The headline likelihood metrics minus the student's, intervals paired over the same resampled prompts."""
    value = {(r["model"], r["metric"]): r for r in rows if r["suite"] == "likelihood"}
    columns = [(title.removesuffix(" [95% CI]"), metric + "_vs_student") for title, suite, metric in HEADLINE
               if suite == "likelihood" and any(m == metric + "_vs_student" for _, m in value)]
    shown = [name for name in names if any((name, metric) in value for _, metric in columns)]
    if not shown:
        return []
    lines = ["", "## Likelihood minus the student's (paired 95% CI)", "",
             "| model | " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    return lines + [f"| {name} | " + " | ".join(cell(value.get((name, metric))) for _, metric in columns) + " |"
                    for name in shown]


def verdict_counts(rows: list[dict]) -> list[str]:
    summary = verdict_summary(rows)
    return ["", summary] if summary else []


def mtbench_section(rows: list[dict], names: list[str]) -> list[str]:
    categories = sorted({r["metric"].removeprefix("category/") for r in rows
                         if r["suite"] == "mtbench" and r["metric"].startswith("category/")})
    if not categories:
        return []
    value = {(r["model"], r["metric"]): r for r in rows if r["suite"] == "mtbench"}
    lines = ["", "## MT-Bench by category", "", "| model | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for name in names:
        if any((name, f"category/{c}") in value for c in categories):
            lines.append(f"| {name} | " + " | ".join(cell(value.get((name, f"category/{c}"))) for c in categories) + " |")
    return lines
