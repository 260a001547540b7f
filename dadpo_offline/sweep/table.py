"""The sweep's results: sweep.csv and sweep.md (one row per point), and a plot per metric against β2.

Metrics are whatever the eval rows hold (suite/metric), plus each point's likelihood shift on its own
training pairs (suite `displacement`); the plots take every likelihood, displacement and lm-eval
metric and the headline judged ones, in a preferred order. On a plot each (loss, β1) is a line over
β2 (symlog axis, so β2 = 0 shows), the mean over seeds with min–max bars; a loss without a β2 axis
(dDPO) is a horizontal line with its seed band, the baselines dotted lines.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from ..core.results import cell
from ..files import atomic_text
from ..losses import LOSSES

PREFERRED = [("likelihood", "reverse_kl_per_token"), ("likelihood", "teacher_answer_ce_per_token"),
             ("likelihood", "teacher_logp_per_token"), ("likelihood", "teacher_logp_per_answer"),
             ("displacement", "chosen_logp_shift_per_token"), ("displacement", "rejected_logp_shift_per_token"),
             ("mtbench", "overall"), ("alpacaeval", "length_controlled_winrate"), ("alpacaeval", "win_rate")]
TRAINING = ["steps", "train_loss", "rewards/margins", "rewards/accuracies"]  # from each point's training summary


def plotted_metrics(rows: list[dict], models: set[str]) -> list[tuple[str, str]]:
    """The (suite, metric) pairs worth a column and a plot: preferred first, then every other likelihood
    and lm-eval metric and the win-rate scores; counts (wins, verdicts, …) stay in the CSV only."""
    found = {(r["suite"], r["metric"]) for r in rows if r["model"] in models and isinstance(r["value"], (int, float))}
    more = sorted(k for k in found - set(PREFERRED) if k[0] in ("likelihood", "lmeval")
                  or (k[0] == "winrate" and k[1].startswith(("score_vs_", "preference_vs_"))))
    return [k for k in PREFERRED if k in found] + more


def write_tables(out: Path, trained: list[tuple], rows: list[dict], evaluated: bool = True) -> list[str]:
    """sweep.csv (every metric), sweep.md (training numbers and plotted metrics) and plots/*.png."""
    names = {point.name for point, _ in trained}
    value = {(r["model"], r["suite"], r["metric"]): r for r in rows}
    every = sorted({(r["suite"], r["metric"]) for r in rows if r["model"] in names})
    shown = plotted_metrics(rows, names)
    training = [{**{k: r.get(k) for k in ("steps", "train_loss")}, **(r["history"][-1] if r.get("history") else {})}
                for _, r in trained]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["point", "loss", "beta1", "beta2", "seed", *TRAINING] + [f"{s}/{m}" for s, m in every])
    for (point, _), stats in zip(trained, training):
        writer.writerow([point.name, point.loss, point.beta1, point.beta2, point.seed]
                        + [stats.get(k, "") for k in TRAINING]
                        + [cell_value(value.get((point.name, s, m))) for s, m in every])
    atomic_text(out / "sweep.csv", buffer.getvalue())
    plots = [plot_metric(trained, rows, key, out / "plots" / f"{safe(key[0])}_{safe(key[1])}.png") for key in shown]
    plots = [p for p in plots if p is not None]
    atomic_text(out / "sweep.md", markdown(trained, training, value, shown, rows, names, plots, out, evaluated))
    return [str(out / "sweep.md"), str(out / "sweep.csv")] + [str(p) for p in plots]


def markdown(trained, training, value, shown, rows, names, plots, out: Path, evaluated: bool) -> str:
    header = ["point", "loss", "β1", "β2", "seed", *TRAINING] + [f"{s}/{m}" for s, m in shown]
    lines = [f"# Sweep: {len(trained)} points", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for (point, _), stats in zip(trained, training):
        numbers = [fmt(stats.get(k)) for k in TRAINING] + [cell(value.get((point.name, s, m))) for s, m in shown]
        lines.append(f"| {point.name} | {point.loss} | {point.beta1:g} | {point.beta2:g} | {point.seed} | "
                     + " | ".join(numbers) + " |")
    baselines = list(dict.fromkeys(r["model"] for r in rows if r["model"] not in names))
    if baselines and shown:
        lines += ["", "## Baselines", "", "| model | " + " | ".join(f"{s}/{m}" for s, m in shown) + " |",
                  "|---" * (len(shown) + 1) + "|"]
        lines += [f"| {b} | " + " | ".join(cell(value.get((b, s, m))) for s, m in shown) + " |" for b in baselines]
    lines += versus_ddpo(trained, value, shown)
    if not evaluated:
        lines += ["", "No eval in this sweep run: rerun without --no-eval for metrics and plots."]
    lines += [""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


def versus_ddpo(trained: list[tuple], value: dict, shown: list[tuple[str, str]]) -> list[str]:
    """Each other point minus the dDPO point of the same seed, averaged over seeds with the min and max:
    the same data order on both sides, so a seed's own luck cancels. The dDPO point has the same β1
    (a loss without β1, rDPO, is matched when one dDPO β1 was swept). The sweep's answer to "closer to
    the teacher than dDPO at equal budget?"."""
    ddpo = defaultdict(dict)  # seed -> β1 -> dDPO point
    for point, _ in trained:
        if point.loss == "ddpo":
            ddpo[point.seed][point.beta1] = point
    compared = [key for key in shown if not key[1].endswith("_vs_student")]  # the student cancels: same numbers
    diffs = defaultdict(lambda: defaultdict(list))  # (loss, β1, β2) -> metric -> differences over seeds
    for point, _ in trained:
        same_seed = ddpo.get(point.seed, {})
        match = same_seed.get(point.beta1) if "beta1" in LOSSES[point.loss].uses else \
            next(iter(same_seed.values())) if len(same_seed) == 1 else None
        if point.loss == "ddpo" or match is None:
            continue
        for key in compared:
            a, b = value.get((point.name, *key)), value.get((match.name, *key))
            if a is not None and b is not None and a["value"] is not None and b["value"] is not None:
                diffs[(point.loss, point.beta1, point.beta2)][key].append(a["value"] - b["value"])
    if not diffs:
        return []
    lines = ["", "## Minus dDPO with the same seed (mean over seeds [min, max])", "",
             "| loss | β1 | β2 | seeds | " + " | ".join(f"Δ {s}/{m}" for s, m in compared) + " |",
             "|---" * (len(compared) + 4) + "|"]
    for (loss, beta1, beta2), by_metric in sorted(diffs.items()):
        seeds = max(len(v) for v in by_metric.values())
        cells = [f"{sum(v) / len(v):+.3f} [{min(v):+.3f}, {max(v):+.3f}]" if (v := by_metric.get(key)) else "–"
                 for key in compared]
        lines.append(f"| {loss} | {beta1:g} | {beta2:g} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def plot_metric(trained: list[tuple], rows: list[dict], key: tuple[str, str], path: Path) -> Path | None:
    suite, metric = key
    by_model = {r["model"]: r["value"] for r in rows if (r["suite"], r["metric"]) == key and r["value"] is not None}
    lines = defaultdict(lambda: defaultdict(list))  # (loss, β1) -> β2 -> values over seeds
    for point, _ in trained:
        if point.name in by_model and math.isfinite(by_model[point.name]):
            lines[(point.loss, point.beta1)][point.beta2].append(by_model[point.name])
    if not lines:
        return None
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    positive = [b2 for series in lines.values() for b2 in series if b2 > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    ticks = sorted({b2 for series in lines.values() for b2 in series if b2 > 0} | {0.0})
    ax.set_xticks(ticks, [f"{b:g}" for b in ticks])  # the swept values themselves, 0 included
    for i, ((loss, beta1), series) in enumerate(sorted(lines.items())):
        label = f"{loss} β1={beta1:g}" if "beta1" in LOSSES[loss].uses else loss
        x = sorted(series)
        mean = [sum(series[b]) / len(series[b]) for b in x]
        low = [m - min(series[b]) for m, b in zip(mean, x)]
        high = [max(series[b]) - m for m, b in zip(mean, x)]
        if "beta2" in LOSSES[loss].uses:
            ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3, color=f"C{i}", label=label)
        else:  # no β2 axis: one level across the plot, its seed spread as a band
            ax.axhline(mean[0], linestyle="--", color=f"C{i}", label=label)
            ax.axhspan(mean[0] - low[0], mean[0] + high[0], color=f"C{i}", alpha=0.15)
    for model, v in by_model.items():
        if model not in {p.name for p, _ in trained} and math.isfinite(v):
            ax.axhline(v, color="grey", linestyle=":", linewidth=1)
            ax.annotate(model, (0, v), xycoords=("axes fraction", "data"), fontsize=8, color="grey",
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("β2 (teacher anchor weight; symlog axis)")
    ax.set_ylabel(metric)
    ax.set_title(f"{suite}/{metric}: mean over seeds, bars min–max")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def cell_value(row: dict | None):
    return "" if row is None or row["value"] is None else row["value"]


def fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
