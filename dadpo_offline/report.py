"""`dadpo-offline report`: plots and a Markdown + HTML summary of one pipeline run folder.

Reads whatever exists of RUN_DIR/cache (teacher margins δ_te over `pairs`), RUN_DIR/train/<stage>
(trainer_state.json log_history, run.json settings) and RUN_DIR/eval/<run id> (results.parquet,
summary.json), and names what is missing instead of failing: a report of a half-finished run is
how one sees where it stopped. The page is built once as blocks and rendered twice, so report.md
and report.html say the same; report.html inlines its images so the single file can be mailed.
Plots use matplotlib's `Figure` directly (Agg canvas, no pyplot state, no display needed).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from .cache.index import INDEX_NAME, dropped_summary, open_cache, pairs_per_prompt
from .core.layout import RunLayout
from .core.results import results_grid, verdict_summary
from .core.steps import training_stages
from .errors import DadpoError, InputError
from .losses import effective_betas

COLUMNS = [  # (title, suite, metric) that lead the results table
    ("MT-Bench", "mtbench", "overall"), ("AlpacaEval win %", "alpacaeval", "win_rate"),
    ("AlpacaEval LC %", "alpacaeval", "length_controlled_winrate"),
    ("vs teacher (W+0.5T)/N [95% CI]", "winrate", "score_vs_teacher"),
    ("vs teacher P(better) [95% CI]", "winrate", "preference_vs_teacher"),
    ("teacher log p / token [95% CI]", "likelihood", "teacher_logp_per_token"),
    ("KL(model‖teacher) / token [95% CI]", "likelihood", "reverse_kl_per_token"),
    ("CE on teacher answers / token [95% CI]", "likelihood", "teacher_answer_ce_per_token"),
]
OWN_SUITES = ("mtbench", "alpacaeval", "winrate", "lmeval", "likelihood")  # their detail (per answer, minus the
# student's with paired intervals) lives in the eval's own report.md
PLOTS = ("training_curves.png", "teacher_margins.png", "mtbench_categories.png", "distillation.png")
DISTILLATION = [  # (likelihood metric, panel title) in panel order, then the judged win rate vs the teacher
    ("teacher_logp_per_token", "teacher log p / token (higher: closer)"),
    ("reverse_kl_per_token", "reverse KL to teacher / token (lower: closer)"),
    ("teacher_answer_ce_per_token", "CE on teacher answers / token (lower: closer)"),
]
WIN_RATE = [("preference_vs_teacher", "P(better than teacher) (judged)"), ("score_vs_teacher", "(W+0.5T)/N vs teacher (judged)")]
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
       "th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%}"
       "code{background:#f4f4f4;padding:0 .2em}")


def write_report(run: RunLayout | Path, out: Path | None = None, eval_run: str | None = None) -> dict:
    """Write PNGs + report.md + report.html into out (default: the run's report folder); return
    {"files": [...], "missing": [...]}. `run` is a manifest's layout, or a run folder in the default one."""
    layout = run if isinstance(run, RunLayout) else RunLayout.in_folder(run)
    run_dir = layout.root
    if not any(part.is_dir() for part in (layout.cache, layout.train, layout.eval)):
        raise InputError(f"{run_dir} is not a pipeline run folder (no cache/, train/ or eval/ in it) — give the "
                         "folder that `dadpo-offline run` filled, e.g. runs/demo, or the run's manifest")
    out = Path(out).expanduser().resolve() if out else layout.report
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # a plot this run cannot draw must not survive from an earlier report
        (out / name).unlink(missing_ok=True)
    missing = []
    stages = read_stages(layout.train, missing)
    margins = read_margins(layout.cache, missing)
    run_id, ev_dir, rows, summary = read_eval(layout.eval, eval_run, missing)
    names = ordered_models(rows, summary)
    plots = {}
    if stages:
        plots["training_curves.png"] = plot_training(stages, out / "training_curves.png")
    if margins:
        plots["teacher_margins.png"] = plot_margins(margins, out / "teacher_margins.png")
    categories = sorted({r["metric"].removeprefix("category/") for r in rows
                         if r["suite"] == "mtbench" and r["metric"].startswith("category/")})
    if categories:
        plots["mtbench_categories.png"] = plot_categories(rows, names, categories, out / "mtbench_categories.png")
    elif rows:
        missing.append(f"MT-Bench categories: eval run {run_id} has no mtbench category/* scores")
    panels = distillation_panels(rows, names)
    if panels:
        plots["distillation.png"] = plot_distillation(panels, out / "distillation.png")
    elif rows:
        missing.append(f"distillation plot: eval run {run_id} has no likelihood metrics — add likelihood to eval.suites")

    blocks = [("h", 1, f"Run report: {run_dir.name}"), ("p", f"Run folder `{run_dir}`.")]
    blocks += results_blocks(run_id, ev_dir, out, rows, names, summary, plots)
    blocks += training_blocks(stages)
    blocks += cache_blocks(margins)
    if missing:
        blocks += [("h", 2, "Missing"), ("ul", missing)]
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, out, f"Run report: {run_dir.name}"), encoding="utf-8")
    files = [out / "report.md", out / "report.html"] + [out / name for name in PLOTS if name in plots]
    return {"files": [str(f) for f in files], "missing": missing}



def read_stages(train: Path, missing: list[str]) -> dict[str, dict]:
    """Per stage folder: the logged steps (entries with a loss) and run.json's settings."""
    stages = {}
    for stage in training_stages():
        folder = train / stage
        if not folder.is_dir():
            continue
        state, settings = read_json(folder / "trainer_state.json"), read_json(folder / "run.json")
        if not isinstance((state or {}).get("log_history"), list):
            missing.append(f"train/{stage}: no readable trainer_state.json (unfinished?) — rerun: dadpo-offline train "
                           f"MANIFEST --stage {'sft' if stage == 'sft' else 'dadpo --loss ' + stage}")
            continue
        if settings is None:
            missing.append(f"train/{stage}: no readable run.json (settings and betas unknown)")
        stages[stage] = {"log": [h for h in state["log_history"] if "loss" in h and "step" in h],
                         "settings": settings or {}}
    if not any((train / stage).is_dir() for stage in training_stages()):
        missing.append("training curves: no train/<stage>/trainer_state.json — run: dadpo-offline train MANIFEST --stage sft")
    return stages


def read_margins(cache_dir: Path, missing: list[str]) -> dict | None:
    """δ_te = teacher_chosen_logp − teacher_rejected_logp per pair (also per token), and δ_ref for comparison."""
    if not (cache_dir / INDEX_NAME).is_file():
        missing.append(f"cache: no cache/{INDEX_NAME} — run: dadpo-offline precompute MANIFEST")
        return None
    try:
        with open_cache(cache_dir).connect() as con:
            columns = con.execute("""
                SELECT teacher_chosen_logp - teacher_rejected_logp AS te,
                       teacher_chosen_logp / nullif(teacher_chosen_tokens, 0)
                         - teacher_rejected_logp / nullif(teacher_rejected_tokens, 0) AS te_token,
                       ref_chosen_logp - ref_rejected_logp AS ref
                FROM pairs""").fetchnumpy()
            splits = con.execute("SELECT split, count(*) FROM pairs GROUP BY ALL ORDER BY split").fetchall()
            teachers = teacher_margins(con)
            dropped = dropped_summary(con)
            per_prompt = pairs_per_prompt(con)
    except (DadpoError, duckdb.Error) as exc:
        missing.append(f"cache: the pairs view cannot be read ({str(exc).splitlines()[0]}) — check: "
                       "dadpo-offline cache verify RUN_DIR/cache")
        return None
    values = {k: finite(v) for k, v in columns.items()}
    if not len(values["te"]):
        missing.append("cache: the pairs view is empty — run: dadpo-offline precompute MANIFEST --stage score")
        return None
    return values | {"splits": splits, "dropped": dropped, "per_prompt": per_prompt, "teachers": teachers}


def teacher_margins(con) -> list[tuple[str, float]]:
    """Several teachers: (name, mean δ_te) of each; [] with one teacher or pairs from before the teachers_* columns."""
    try:
        return con.execute("""
            SELECT name, avg(c - r) FROM (SELECT unnest(teachers) AS name, unnest(teachers_chosen_logp) AS c,
                unnest(teachers_rejected_logp) AS r FROM pairs WHERE teachers <> ['teacher'])
            GROUP BY name ORDER BY name""").fetchall()
    except duckdb.BinderException:
        return []


def finite(column) -> np.ndarray:
    data = np.ma.filled(np.ma.asarray(column, dtype=float), np.nan)
    return data[np.isfinite(data)]


def read_eval(eval_dir: Path, eval_run: str | None, missing: list[str]) -> tuple[str | None, Path | None, list, dict]:
    """The chosen eval run (default: the newest run id, i.e. the latest UTC start time) and its result rows."""
    runs = sorted((p.parent.name for p in eval_dir.glob("*/results.parquet")), key=run_order) if eval_dir.is_dir() else []
    if eval_run is not None and eval_run not in runs:
        raise InputError(f"--eval-run {eval_run}: no {eval_dir / eval_run / 'results.parquet'} "
                         f"(runs: {', '.join(runs) or 'none'})")
    if not runs:
        missing.append("eval: no eval/<run id>/results.parquet — run: dadpo-offline eval MANIFEST")
        return None, None, [], {}
    run_id = eval_run or runs[-1]
    folder = eval_dir / run_id
    try:
        rows = pq.read_table(folder / "results.parquet").to_pylist()
    except (OSError, ValueError) as exc:
        missing.append(f"eval/{run_id}: results.parquet unreadable ({str(exc).splitlines()[0]})")
        return None, None, [], {}
    return run_id, folder, rows, read_json(folder / "summary.json") or {}


def read_json(path: Path) -> dict | None:
    """The file's JSON object; None when it is absent or unreadable (a run cut short)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_order(name: str) -> tuple:
    """Run ids are UTC stamps with an optional -N for runs started in the same second: -10 after -9."""
    found = re.fullmatch(r"(\d{8}-\d{6})(?:-(\d+))?", name)
    return (found[1], int(found[2] or 1)) if found else (name, 0)


def ordered_models(rows: list[dict], summary: dict) -> list[str]:
    """student → reference → sft → the losses in registry order → baselines → teacher, only those with results."""
    found = dict.fromkeys(list(summary.get("models") or {}) + [r["model"] for r in rows])
    present = [m for m in found if any(r["model"] == m for r in rows)]
    order = ["student", "reference", *training_stages()]
    rest = [m for m in present if m not in order and m != "teacher"]
    return [m for m in order if m in present] + rest + (["teacher"] if "teacher" in present else [])



def betas(stage: str, settings: dict) -> tuple:
    """The betas the stage's loss really used (ddpo drops β2, rdpo β1); with several teachers, β2 by teacher name."""
    teachers = settings.get("teachers")
    if teachers:
        beta1, beta2 = effective_betas(stage, settings.get("beta1"), tuple(teachers.values()))
        return beta1, dict(zip(teachers, beta2))
    return effective_betas(stage, settings.get("beta1"), settings.get("beta2"))


def plot_training(stages: dict[str, dict], path: Path) -> Path:
    fig = Figure(figsize=(18, 3.6 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), 4, squeeze=False)
    for row, (stage, info) in zip(axes, stages.items()):
        log = info["log"]
        series = lambda key: ([h["step"] for h in log if key in h], [h[key] for h in log if key in h])
        row[0].plot(*series("loss"), label="loss")
        row[0].set(title=f"{stage}: loss", xlabel="step", ylabel="loss")
        if stage == "sft":
            for ax in row[1:]:
                ax.set_axis_off()
            row[0].legend()
            continue
        b1, b2 = betas(stage, info["settings"])
        row[0].axhline(np.log(2), color="grey", linestyle=":", label="log 2 (z = 0)")
        row[1].plot(*series("ref_term"), label=f"β1·ref_margin (β1={b1})")
        row[1].plot(*series("teacher_term"), label=f"β2·teacher_margin (β2={b2})")
        row[1].set(title=f"{stage}: margin terms of z", xlabel="step", ylabel="nats (β-weighted)")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            row[2].plot(*series(key), label=key)
        row[2].set(title=f"{stage}: implicit rewards", xlabel="step", ylabel="reward")
        row[3].plot(*series("rewards/accuracies"), label="rewards/accuracies")
        row[3].set(title=f"{stage}: fraction of pairs with z > 0", xlabel="step", ylabel="accuracy", ylim=(-0.05, 1.05))
        for ax in row:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=80)
    return path


def plot_margins(margins: dict, path: Path) -> Path:
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    for ax, key, unit in zip(fig.subplots(1, 2), ("te", "te_token"), ("nats per sequence", "nats per token")):
        values = margins[key]
        ax.hist(values, bins=40, color="tab:blue", alpha=0.75, label=f"{len(values)} pairs")
        ax.axvline(values.mean(), color="tab:red", label=f"mean {values.mean():.3f}")
        ax.axvline(np.median(values), color="tab:orange", linestyle="--", label=f"median {np.median(values):.3f}")
        ax.set(title=f"Teacher margin δ_te ({unit})", xlabel=f"log π_te(y_w) − log π_te(y_l), {unit}", ylabel="pairs")
        ax.legend()
    fig.savefig(path, dpi=80)
    return path


def plot_categories(rows: list[dict], names: list[str], categories: list[str], path: Path) -> Path:
    value = {(r["model"], r["metric"]): r for r in rows if r["suite"] == "mtbench" and r["value"] is not None}
    models = [m for m in names if any((m, f"category/{c}") in value for c in categories)]
    fig = Figure(figsize=(max(8, 2 + 0.35 * len(categories) * len(models)), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        got = [value.get((model, f"category/{c}")) for c in categories]
        ax.bar(np.arange(len(categories)) + (i - (len(models) - 1) / 2) * width, [g["value"] if g else 0 for g in got],
               width, yerr=[(g["stderr"] or 0) if g else 0 for g in got], capsize=2, label=model)
    ax.set_xticks(np.arange(len(categories)), categories)
    ax.set(title="MT-Bench score by category", xlabel="category", ylabel="judge score (1–10)", ylim=(0, 11),
           yticks=range(0, 11, 2))  # headroom for the legend
    ax.legend(ncols=min(len(models), 6), fontsize="small")
    fig.savefig(path, dpi=80)
    return path


def distillation_panels(rows: list[dict], names: list[str]) -> list[tuple[str, str, list[tuple], list[tuple]]]:
    """(metric, title, [(model, value, ci_low, ci_high)] in model order, the same for the model minus the
    student with its paired interval) per DISTILLATION metric present, then one win-rate panel (graded
    preference where the judge gave log-probs, else (W+0.5T)/N; no differences). The teacher's difference
    is left out: its gap, plain in the values, would set the scale of the small ones that matter.

    Empty without a likelihood metric; intervals are null where the row has none.
    """
    value = {(r["suite"], r["metric"], r["model"]): r for r in rows if r["value"] is not None}
    points = lambda suite, metric: [(m, value[(suite, metric, m)]["value"], value[(suite, metric, m)].get("ci_low"),
                                     value[(suite, metric, m)].get("ci_high")) for m in names if (suite, metric, m) in value]
    moved = lambda metric: [p for p in points("likelihood", f"{metric}_vs_student") if p[0] != "teacher"]
    panels = [(metric, title, points("likelihood", metric), moved(metric)) for metric, title in DISTILLATION]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return []
    judged = [(metric, title, points("winrate", metric), []) for metric, title in WIN_RATE]
    return panels + [panel for panel in judged if panel[2]][:1]


def plot_distillation(panels: list[tuple[str, str, list[tuple], list[tuple]]], path: Path) -> Path:
    """One column per metric, models along x, a point per model with its 95% interval where it has one;
    a second row, where measured, with each model minus the student and its paired interval: the
    per-model intervals overlap when models are close, the paired differences say which moved."""
    rows = 2 if any(deltas for *_, deltas in panels) else 1
    fig = Figure(figsize=(4.5 * len(panels) + 1, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for column, (metric, title, points, deltas) in enumerate(panels):
        draw_points(axes[0][column], points, title, metric)
        if metric.endswith("_vs_teacher"):
            axes[0][column].axhline(0.5, color="grey", linestyle=":", label="as good as the teacher")
            axes[0][column].legend(fontsize="small")
        if rows == 2 and deltas:
            draw_points(axes[1][column], deltas, "minus the student (paired 95% interval)", f"Δ {metric}")
            axes[1][column].axhline(0.0, color="grey", linestyle=":")
        elif rows == 2:
            axes[1][column].set_axis_off()
    fig.savefig(path, dpi=80)
    return path


def draw_points(ax, points: list[tuple], title: str, ylabel: str) -> None:
    x = np.arange(len(points))
    values = np.array([v for _, v, _, _ in points])
    low = [v - lo if lo is not None else 0.0 for _, v, lo, _ in points]
    high = [hi - v if hi is not None else 0.0 for _, v, _, hi in points]
    ax.errorbar(x, values, yerr=[low, high], fmt="o", capsize=4, color="tab:blue")
    ax.set_xticks(x, [m for m, *_ in points], rotation=30)
    ax.set(title=title, xlabel="model", ylabel=ylabel)
    ax.margins(x=0.15)


def results_blocks(run_id, ev_dir, out: Path, rows, names, summary, plots) -> list:
    if not rows:
        return []
    others = [(f"{s}/{m}", s, m) for s, m in dict.fromkeys((r["suite"], r["metric"]) for r in rows) if s not in OWN_SUITES]
    header, table = results_grid(rows, names, COLUMNS + others)
    judges = sorted({(r["suite"], r["judge"]) for r in rows if r.get("judge")})
    blocks = [("h", 2, f"Results (eval run {run_id})"),
              ("p", "lm-eval cells show the delta vs the student in parentheses (the alignment tax). "
                    f"Per-suite detail: `{os.path.relpath(ev_dir / 'report.md', out)}`."),
              ("table", header, table)]
    if judges:
        blocks += [("p", "Judges (scores from different judges are not comparable):"),
                   ("ul", [f"{suite}: `{judge}`" for suite, judge in judges])]
    if summary.get("judge"):
        blocks.append(("p", f"Judge settings: `{json.dumps(summary['judge'], sort_keys=True)}`."))
    counts = verdict_summary(rows)
    if counts:
        blocks.append(("p", counts))
    if "distillation.png" in plots:
        blocks.append(("img", "distillation.png", "Distillation metrics by model (95% intervals where known)"))
    if "mtbench_categories.png" in plots:
        blocks.append(("img", "mtbench_categories.png", "MT-Bench score by category"))
    return blocks


def training_blocks(stages: dict) -> list:
    if not stages:
        return []
    table = []
    for stage, info in stages.items():
        last = info["log"][-1] if info["log"] else {}
        b1, b2 = betas(stage, info["settings"]) if stage != "sft" else (None, None)
        table.append([stage, fmt(b1), fmt(b2), fmt(last.get("step")),
                      *(fmt(last.get(k)) for k in ("loss", "rewards/margins", "rewards/accuracies"))])
    keys = list(dict.fromkeys(k for info in stages.values() for k in info["settings"]))
    settings = [[k] + [fmt(info["settings"].get(k)) for info in stages.values()] for k in keys]
    blocks = [("h", 2, "Training"), ("table", ["stage", "β1", "β2", "steps", "final loss", "final rewards/margins",
                                               "final rewards/accuracies"], table),
              ("img", "training_curves.png", "Training curves")]
    if settings:
        blocks += [("p", "Settings per stage (run.json):"), ("table", ["setting", *stages], settings)]
    return blocks


def cache_blocks(margins: dict | None) -> list:
    if not margins:
        return []
    te, token, ref = margins["te"], margins["te_token"], margins["ref"]
    dropped = margins["dropped"]
    stats = [f"pairs trained on: {sum(n for _, n in margins['splits'])} ("
             + ", ".join(f"{split} {n}" for split, n in margins["splits"]) + "); dropped: "
             + (dropped or "none")
             + " (pairs.require_finished; SQL view dropped_pairs)",
             f"pairs trained on per prompt: {margins['per_prompt']} (pairs.policy)",
             f"δ_te = log π_te(y_w) − log π_te(y_l): mean {te.mean():.3f}, median {np.median(te):.3f} nats per "
             f"sequence; mean {token.mean() if len(token) else float('nan'):.4f} nats per token",
             f"δ_ref = log π_ref(y_w) − log π_ref(y_l): mean {ref.mean() if len(ref) else float('nan'):.3f} nats "
             "(at step 0 the teacher term of z is β2·(δ_ref − δ_te))"]
    if margins["teachers"]:  # δ_te above is the chosen answers' teacher's (pairs.chosen_from)
        stats.append("δ_te by teacher (teachers:; δ_te above: pairs.chosen_from's): " + ", ".join(
            f"{name} mean {mean:.3f}" for name, mean in margins["teachers"]) + " nats per sequence")
    return [("h", 2, "Cache"), ("ul", stats), ("img", "teacher_margins.png", "Teacher margins")]


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def to_markdown(blocks: list) -> str:
    md_cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    lines = []
    for kind, *args in blocks:
        if kind == "h":
            lines += ["#" * args[0] + " " + args[1], ""]
        elif kind == "p":
            lines += [args[0], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in args[0]] + [""]
        elif kind == "img":
            lines += [f"![{args[1]}]({args[0]})", ""]
        elif kind == "table":
            header, rows = args
            lines += ["| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in rows] + [""]
    return "\n".join(lines)


def to_html(blocks: list, out: Path, title: str) -> str:
    text = lambda v: re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(str(v)))
    body = []
    for kind, *args in blocks:
        if kind == "h":
            body.append(f"<h{args[0]}>{text(args[1])}</h{args[0]}>")
        elif kind == "p":
            body.append(f"<p>{text(args[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{text(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((out / args[0]).read_bytes()).decode("ascii")
            body.append(f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(args[1])}"></p>')
        elif kind == "table":
            header, rows = args
            body.append("<table><tr>" + "".join(f"<th>{text(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{text(v)}</td>" for v in row) + "</tr>" for row in rows)
                        + "</table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
