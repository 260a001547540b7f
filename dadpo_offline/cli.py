"""`dadpo-offline`: a thin click layer over the package. Errors cross it once, here.

Stdout carries data (query rows, summaries); progress bars and logs go to stderr.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import DadpoError
from .losses import LOSSES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MANIFEST = "manifests/demo.yaml"


def domain_errors(command):
    """Turn DadpoError into a one-line `Error: …` and exit code 1; no traceback for user mistakes."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DadpoError as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def manifest_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a manifest field, e.g. --set generate.teacher.temperature=0 (repeatable).")(command)
    return click.argument("manifest", required=False, type=click.Path(dir_okay=False))(command)


def load(manifest_path, overrides):
    from .manifest import load_manifest

    if manifest_path is None and Path(DEFAULT_MANIFEST).is_file():
        manifest_path = DEFAULT_MANIFEST
    return load_manifest(manifest_path, list(overrides))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V")
def main():
    """Distil a large chat LLM (teacher) into a small one (student) with daDPO.

    \b
    Phase one precomputes generations and log-probs into a Parquet cache indexed by DuckDB;
    phase two trains the student with only the student in memory; eval measures the result.

    \b
    Example:
      dadpo-offline precompute manifests/demo.yaml
      dadpo-offline sql runs/demo/cache "SELECT count(*) FROM pairs"
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout by default: ours is data


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--stage", type=click.Choice(["all", "prompts", "generate", "score"]), default="all", show_default=True,
              help="Which stages to run; score needs generate's shards.")
@click.option("--shard", "shard_spec", metavar="I/N",
              help="Do only work shards k with k % N == I, so N jobs fill one cache; then run `cache index` once.")
@click.option("--force", is_flag=True, help="Recompute this job's shards even when intact ones exist.")
@domain_errors
def precompute(manifest, overrides, stage, shard_spec, force):
    """Generate teacher and student responses and score them into the cache.

    \b
    Resumable: rerun the same command after a crash and only missing shards are built.
    Without MANIFEST, manifests/demo.yaml (or the built-in defaults) is used. A lone job
    indexes the cache after each stage; --shard jobs never open the index: index the cache
    once they have all finished (dadpo-offline cache index CACHE).

    \b
    Example:
      dadpo-offline precompute manifests/demo.yaml --stage generate --shard 0/2
    """
    from .precompute.run import format_summary, precompute as run_precompute

    m = load(manifest, overrides)
    summary = run_precompute(m, stage=stage, shard_spec=shard_spec, force=force)
    click.echo(format_summary(summary))
    click.echo(f"cache: {m.cache_dir}")


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--dry-run", is_flag=True, help="Validate the manifest and print the plan; download and load nothing.")
@click.option("--through", metavar="STEP", help="Stop after this step (prune, generate, dsft, score, a loss, eval): "
              "e.g. --through score leaves the cache and reference a sweep trains from.")
@domain_errors
def run(manifest, overrides, dry_run, through):
    """Run the whole pipeline for a manifest (default: manifests/demo.yaml).

    \b
    prune (if prune.source) → precompute → dSFT → score with the dSFT reference → train.loss and
    train.compare (same budget) → eval → report. Rerun after an interruption to continue: every
    step keeps what it finished. Without arguments it runs the embedded demo on the CPU.

    \b
    Example:
      dadpo-offline run
      dadpo-offline run manifests/qwen7b_to_qwen1.5b.yaml --dry-run
      dadpo-offline run manifests/study.yaml --through score
    """
    m = load(manifest, overrides)
    if dry_run:
        from .plan import format_plan, plan

        click.echo(format_plan(plan(m)))
        return
    from .core.layout import RunLayout
    from .pipeline import format_steps, run_pipeline

    steps = run_pipeline(m, through)
    click.echo(format_steps(steps))
    click.echo(f"report: {RunLayout.of(m).report / 'report.md'}; query: dadpo-offline sql {m.cache_dir} "
               "\"SELECT model, metric, value FROM eval_results\"", err=True)


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--stage", type=click.Choice(["sft", "dadpo"]), default="dadpo", show_default=True,
              help="sft: fine-tune the student on teacher responses (makes the reference; settings: sft.*); "
                   "dadpo: preference training (settings: train.*).")
@click.option("--loss", type=click.Choice(sorted(LOSSES)), help="Loss for --stage dadpo (default: train.loss).")
@click.option("--beta1", type=float, help="Weight of the reference anchor (default: train.beta1).")
@click.option("--beta2", type=float, help="Weight of the teacher anchor (default: train.beta2).")
@click.option("--max-steps", type=int, help="Stop after this many optimiser steps (default: sft.max_steps or train.max_steps).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Folder for stage outputs (default: train.output_dir).")
@click.option("--resume/--no-resume", default=None, help="Continue from the newest checkpoint (default: sft.resume or train.resume).")
@domain_errors
def train(manifest, overrides, stage, loss, beta1, beta2, max_steps, output_dir, resume):
    """Train the student: dSFT, then daDPO / dDPO / rDPO from the cache.

    \b
    Only the student policy (and its optimiser) is in memory: reference and teacher log-probs are
    read from the cache. Rerun the same command after a crash to resume from the last checkpoint.
    Each stage has its own settings (sft.* and train.*) and its own run identity.
    A LoRA student: --set sft.peft.rank=16 (or train.peft.*); the stage writes the adapter and merged/.
    Multi-GPU: accelerate launch --config_file manifests/accelerate_fsdp.yaml -m dadpo_offline train ...

    \b
    Example:
      dadpo-offline train manifests/demo.yaml --stage sft
      dadpo-offline train manifests/demo.yaml --stage dadpo --loss dadpo --beta1 0.1 --beta2 0.01
      dadpo-offline train manifests/demo.yaml --stage sft --set sft.peft.rank=16
    """
    import json

    section = "sft" if stage == "sft" else "train"
    flags = {"train.loss": loss, "train.beta1": beta1, "train.beta2": beta2, f"{section}.max_steps": max_steps,
             f"{section}.resume": resume,
             "train.output_dir": str(Path(output_dir).resolve()) if output_dir else None}  # a flag's path is the shell's
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    m = load(manifest, list(overrides) + extra)
    if stage == "sft":
        from .train.sft import train_sft

        result = train_sft(m)
    else:
        from .train.dpo import train_dadpo

        result = train_dadpo(m)
    last = result["history"][-1] if result["history"] else {}
    summary = {"stage": stage if stage == "sft" else m.train.loss, "output_dir": result["output_dir"],
               "steps": result["steps"], "train_loss": result["train_loss"], "resumed_from": result["resumed_from"]}
    summary.update({k: last[k] for k in ("rewards/margins", "rewards/accuracies") if k in last})
    if result.get("skipped"):
        summary["skipped"] = result["skipped"]
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, one summary line, not one per GPU
        click.echo(json.dumps(summary))


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--loss", "losses", metavar="LIST", help="Comma-separated losses (default: sweep.losses, else train.loss).")
@click.option("--beta1", metavar="LIST", help="Comma-separated β1 values (default: sweep.beta1, else train.beta1).")
@click.option("--beta2", metavar="LIST", help="Comma-separated β2 values (default: sweep.beta2, else train.beta2).")
@click.option("--seeds", metavar="LIST", help="Comma-separated seeds (default: sweep.seeds, else train.seed).")
@click.option("--suite", "suites", metavar="LIST", help="Comma-separated eval suites (default: sweep.suites: likelihood).")
@click.option("--max-steps", type=int, help="Optimiser steps of every point (default: train.max_steps).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Sweep folder (default: sweep.output_dir, "
              "else <cache_dir>/../sweep).")
@click.option("--no-eval", is_flag=True, help="Train the points only: the table holds training numbers, no plots.")
@click.option("--dry-run", is_flag=True, help="List the points and which are finished; train and load nothing.")
@domain_errors
def sweep(manifest, overrides, losses, beta1, beta2, seeds, suites, max_steps, output_dir, no_eval, dry_run):
    """Train a grid of losses x β1 x β2 x seeds from one cache, evaluate it once, plot each metric against β2.

    \b
    Every point is an ordinary `train --stage dadpo` output in <sweep>/points/<loss>-b1_<β1>-b2_<β2>-seed_<s>,
    started from the reference (the dSFT output unless the manifest sets `reference:`): finished points
    are skipped, a killed sweep resumes the point it was in. A loss that ignores a beta (ddpo: β2,
    rdpo: β1) trains once along that axis. One eval of every point and the baselines shares cached
    answers and judgments; then <sweep>/sweep.md, sweep.csv and plots/<suite>_<metric>.png.

    \b
    Example:
      dadpo-offline sweep manifests/demo.yaml --loss dadpo,ddpo --beta1 0.1 --beta2 0,0.01,0.1,1 --seeds 1,2,3
      dadpo-offline sweep manifests/demo.yaml --dry-run
    """
    import json

    flags = {f"sweep.{key}": f"[{value}]" for key, value in
             (("losses", losses), ("beta1", beta1), ("beta2", beta2), ("seeds", seeds), ("suites", suites)) if value}
    if max_steps is not None:
        flags["train.max_steps"] = str(max_steps)
    if output_dir:
        flags["sweep.output_dir"] = json.dumps(str(Path(output_dir).resolve()))  # a flag's path is the shell's
    m = load(manifest, list(overrides) + [f"{k}={v}" for k, v in flags.items()])
    from .sweep.run import describe, run_sweep

    if dry_run:
        click.echo(describe(m))
        return
    result = run_sweep(m, evaluate_points=not no_eval)
    click.echo(Path(result["files"][0]).read_text(encoding="utf-8"), nl=False)
    for path in result["files"]:
        click.echo(f"wrote {path}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--method", type=click.Choice(["depth", "width"]), default="depth", show_default=True,
              help="depth: remove whole decoder layers; width: remove MLP channels and query heads in every layer "
                   "(LLM-Pruner's kind, the paper's student).")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="depth: fraction of decoder layers removed; width: fraction of every layer's MLP channels removed "
                   "(kept channels rounded to a multiple of 8).")
@click.option("--head-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="width only: fraction of the query heads of every KV-head group removed; it must remove whole "
                   "heads (SmolLM2, 3 per group: 0, 0.333 or 0.667).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the pruned model; must be missing, empty, or an earlier identical prune.")
@click.option("--calibration-prompts", type=click.IntRange(min=1), default=32, show_default=True,
              help="Built-in train prompts that rank the layers (depth) or heads and channels (width).")
@click.option("--revision", help="Hub revision of MODEL (default: main).")
@click.option("--chat-template", type=click.Path(dir_okay=False, exists=True),
              help="Jinja chat template for a tokenizer without one (e.g. manifests/templates/vicuna_v1.1.jinja).")
@domain_errors
def prune(model, method, ratio, head_ratio, out, calibration_prompts, revision, chat_template):
    """Make a smaller student by removing the decoder layers, or the heads and MLP channels, that matter least.

    \b
    MODEL is a hub id, a local folder or embedded:NAME. depth scores each layer by the mean
    1 - cosine(input, output) of its hidden states on the calibration prompts; the lowest
    round(ratio x layers) go. width removes, in every layer alike, ratio of the MLP channels and
    head_ratio of the query heads of each KV-head group (whole heads only; key/value heads stay,
    or go with their query head under multi-head attention), ranked by first-order Taylor
    importance sum |w x dL/dw| on the calibration prompts; hidden and head sizes stay.
    OUT gets a plain Hugging Face model folder plus prune.json (the report, also printed, with
    parameter counts before and after); rerunning the same command is a no-op.

    \b
    Example:
      dadpo-offline prune Qwen/Qwen2.5-7B-Instruct --ratio 0.2 --out models/qwen7b-pruned20
      dadpo-offline prune lmsys/vicuna-7b-v1.5 --method width --ratio 0.2 --head-ratio 0.1875 \\
          --out models/vicuna7b-width20 --chat-template manifests/templates/vicuna_v1.1.jinja
      dadpo-offline prune embedded:smollm2-135m-instruct --out runs/demo/student --calibration-prompts 8
    """
    import json

    from .prune import prune_model

    if method == "depth" and head_ratio:
        raise click.UsageError("--head-ratio applies to --method width only")
    click.echo(json.dumps(prune_model(model, ratio, Path(out), calibration_prompts, revision, chat_template,
                                      method=method, head_ratio=head_ratio)))


@main.command(name="eval", context_settings=CONTEXT)
@manifest_options
@click.option("--suite", "suites", metavar="LIST",
              help="Comma-separated suites: mtbench, alpacaeval, winrate, lmeval, likelihood (default: eval.suites).")
@click.option("--model", "models", multiple=True, metavar="NAME=MODEL",
              help="Also evaluate this model (hub id, local folder or embedded:NAME) under NAME; repeatable.")
@click.option("--only", metavar="NAMES", help="Comma-separated model names to evaluate (default: every model).")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Folder receiving this run's results folder (default: eval.output_dir, else <cache_dir>/../eval).")
@domain_errors
def eval_command(manifest, overrides, suites, models, only, output_dir):
    """Evaluate models: MT-Bench, AlpacaEval, win rate vs teacher, lm-eval alignment tax.

    \b
    Models: teacher, student, the manifest's reference, every trained output found under
    train.output_dir (sft, dadpo, ddpo, rdpo), eval.models, and --model flags. Answers and judge
    calls are cached (rerun to resume; another run reuses them); each run writes
    <output_dir>/<run id>/ with results.parquet, summary.json and report.md, and prints the report.
    Judges: any OpenAI-compatible endpoint (eval.judge.base_url / model; key from the variable
    named by eval.judge.api_key_env). Verdicts are read from the judge's log-probabilities of the
    verdict tokens where it returns them (eval.judge.logprobs), else from the text; the report
    counts each way. likelihood needs no judge: teacher log-prob of greedy answers, KL(model‖teacher)
    and cross-entropy on the teacher's samples (eval.likelihood.samples per prompt, temperature 1).
    SQL: answers, answer_scores, judgments and eval_results views.

    \b
    Example:
      dadpo-offline eval manifests/demo.yaml --suite winrate
      dadpo-offline eval m.yaml --set eval.judge.base_url=https://api.openai.com/v1 --set eval.judge.model=gpt-4
      dadpo-offline eval m.yaml --suite lmeval --model base=Qwen/Qwen2.5-1.5B-Instruct --only student,base
    """
    from .eval.run import evaluate
    from .manifest import EVAL_SUITES

    chosen = [s.strip() for s in suites.split(",") if s.strip()] if suites else None
    if chosen and any(s not in EVAL_SUITES for s in chosen):
        raise click.BadParameter(f"{suites!r}: choose from {', '.join(EVAL_SUITES)}", param_hint="--suite")
    extra = {}
    for item in models:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise click.BadParameter(f"{item!r} is not NAME=MODEL", param_hint="--model")
        extra[name] = ref
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    m = load(manifest, overrides)
    result = evaluate(m, chosen, extra, names, str(Path(output_dir).resolve()) if output_dir else None)
    click.echo((result.run_dir / "report.md").read_text(encoding="utf-8"), nl=False)
    click.echo(f"results: {result.run_dir}  ({', '.join(f'{k} {v} s' for k, v in result.seconds.items())}); "
               f"query: dadpo-offline sql {m.cache_dir} \"SELECT * FROM eval_results WHERE run_id = '{result.run_id}'\"",
               err=True)


@main.command(context_settings=CONTEXT)
@click.argument("target", metavar="RUN_DIR|MANIFEST", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of MANIFEST, e.g. --set train.output_dir=/scratch/train (repeatable).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the PNGs, report.md and report.html (default: the run folder's report/).")
@click.option("--eval-run", metavar="ID", help="Eval run folder to report (default: the newest).")
@domain_errors
def report(target, overrides, out, eval_run):
    """Write plots and a Markdown + HTML summary of one pipeline run.

    \b
    Give the run folder that `run` filled (cache/, train/, eval/ inside it) or the run's manifest,
    which also finds outputs that train.output_dir and eval.output_dir moved elsewhere. Reads what
    exists: the cache (teacher margins over pairs), each training stage (curves, settings) and an
    eval run (results table, MT-Bench categories); lists what is missing. Prints the path of
    report.md; report.html is one file with the images inline, fit to mail.

    \b
    Example:
      dadpo-offline report runs/demo
      dadpo-offline report manifests/demo.yaml --out /tmp/demo-report --eval-run 20250101-120000
    """
    from .core.layout import RunLayout
    from .report import write_report

    if Path(target).is_file() and Path(target).suffix in (".yaml", ".yml"):
        layout = RunLayout.of(load(target, overrides))
    elif overrides:
        raise click.BadParameter("--set needs a MANIFEST, not a run folder", param_hint="--set")
    else:
        layout = RunLayout.in_folder(target)
    result = write_report(layout, Path(out) if out else None, eval_run)
    for path in result["files"]:
        click.echo(f"wrote {path}", err=True)
    for line in result["missing"]:
        click.echo(f"missing: {line}", err=True)
    click.echo(next(path for path in result["files"] if path.endswith("report.md")))


OUTPUT_FORMATS = ["table", "csv", "json", "jsonl", "parquet"]


def output_options(command):
    command = click.option("--output", "-o", type=click.Path(dir_okay=False),
                           help="Write to this file instead of stdout (required for parquet).")(command)
    command = click.option("--format", "-f", "fmt", type=click.Choice(OUTPUT_FORMATS), default="table",
                           show_default=True, help="Output format.")(command)
    return command


@main.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--param", "-p", "params", multiple=True, help="A value for a ? placeholder (repeatable, in order).")
@output_options
@domain_errors
def sql(cache_dir, query, params, fmt, output):
    """Run a read-only SQL query over the cache's views (prompts, generations, scores, pairs).

    \b
    One SELECT (DESCRIBE, SUMMARIZE, SHOW, VALUES included) or EXPLAIN [ANALYZE] of
    one runs; anything else is refused. The connection is read-only and reads only
    files inside the cache folder.

    \b
    Example:
      dadpo-offline sql runs/demo/cache "SELECT avg(teacher_chosen_logp - teacher_rejected_logp) FROM pairs"
      dadpo-offline sql runs/demo/cache "SELECT * FROM prompts WHERE category = ?" -p coding -f json
    """
    from .cache.query import run_query, write_rows

    table = run_query(cache_dir, query, list(params))
    write_rows(table, fmt, output)


@main.group(context_settings=CONTEXT)
def cache():
    """Inspect, check and clean a cache directory."""


@cache.command("index", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@domain_errors
def index_command(cache_dir):
    """Build index.duckdb from the shards' commit records and replace it atomically.

    \b
    Workers (`precompute --shard I/N`, on any node) never open the index: each shard is
    committed by a small record beside it. Run this once they have all finished, on one
    machine; a lone precompute, run and eval call it for you after each stage. A shard
    whose job was killed before its record is not indexed; rerunning that job finishes it.
    Rerunning this command gives the same index; a reader that has the old one open keeps
    reading it, whole.

    \b
    Example:
      dadpo-offline cache index runs/demo/cache
      sbatch --dependency=afterok:$ARRAY_JOB_ID --wrap "dadpo-offline cache index runs/demo/cache"
    """
    from .cache.index import is_cache, open_cache
    from .cache.publish import build_index

    if not is_cache(Path(cache_dir).expanduser().resolve()):
        open_cache(cache_dir)  # raises: not a cache, or no cache yet
    done = build_index(open_cache(cache_dir, create=True))
    click.echo(f"indexed {done.shards} shards ({done.rows} rows) of {done.stages} stage fingerprints "
               f"in {done.seconds:.1f} s", err=True)


@cache.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@output_options
@domain_errors
def status(cache_dir, fmt, output):
    """Show each stage: fingerprint, shards done of expected, rows, bytes, active or stale.

    \b
    Phase one's stages, eval's answers, judgments and results, and eval's files (lmeval:
    one lm-eval result per model and task group; alpacaeval: alpaca_eval's judgment cache).

    \b
    Example:
      dadpo-offline cache status runs/demo/cache
    """
    import pyarrow as pa

    from .cache import open_cache
    from .cache.query import write_rows

    rows = open_cache(cache_dir).status()
    write_rows(pa.Table.from_pylist(rows) if rows else pa.table({"stage": pa.array([], pa.string())}), fmt, output)


@cache.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@domain_errors
def verify(cache_dir):
    """Check every registered shard's size, checksum and metadata; name each bad one.

    \b
    Eval's lm-eval and AlpacaEval files are checked too (size and checksum). Exit 1 when
    one is missing or corrupted; rerunning the command that made it rebuilds it.

    \b
    Example:
      dadpo-offline cache verify runs/demo/cache
    """
    from .cache import open_cache

    problems = open_cache(cache_dir).verify()
    for problem in problems:
        click.echo(problem)
    if problems:
        raise click.ClickException(f"{len(problems)} bad shard(s) — rerun: dadpo-offline precompute MANIFEST "
                                   "(eval's stages: dadpo-offline eval MANIFEST)")
    click.echo("all shards intact")


@cache.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="List what would be removed and the space it would free; change nothing.")
@domain_errors
def gc(cache_dir, dry_run):
    """Remove stale fingerprints and files that no commit record points to.

    \b
    Stale: a fingerprint that a changed setting replaced (accumulating eval stages keep
    every fingerprint). Also removed: leftover temporary files, unregistered shards and
    files (a killed job's temporary files), empty folders. Never touched: active and
    eval data, commit records, the index. Prints one line per removal and the space
    freed, then rebuilds the index. Run it when no job writes to the cache.

    \b
    Example:
      dadpo-offline cache gc runs/demo/cache --dry-run
      dadpo-offline cache gc runs/demo/cache
    """
    from .cache.gc import collect_garbage, human_bytes

    removals = collect_garbage(cache_dir, dry_run)
    for removal in removals:
        click.echo(f"{'would remove' if dry_run else 'removed'}  {os.path.join(cache_dir, removal.path)} "
                   f"({removal.what}, {human_bytes(removal.bytes)})")
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(sum(r.bytes for r in removals))}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
