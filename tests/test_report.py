"""`dadpo-offline report` on a run folder built by hand: a real cache, eval results saved the way
`eval` saves them, trainer logs as `train` writes them — no model is run."""
import json

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dadpo_offline.cache import open_cache
from dadpo_offline.cache.publish import build_index
from dadpo_offline.cache.schema import PAIRS
from dadpo_offline.cache.shards import shard_path, write_shard
from dadpo_offline.cli import main
from dadpo_offline.errors import InputError
from dadpo_offline.eval.results import save_results
from dadpo_offline.report import distillation_panels, run_order, to_html, to_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JUDGE = "judge-model@http://127.0.0.1:8000/v1"
ORDER = ["student", "sft", "ddpo", "dadpo", "teacher"]
MTBENCH = {"student": 3.5, "sft": 5.25, "ddpo": 5.5, "dadpo": 6.125, "teacher": 8.0}
VS_TEACHER = {"student": (0.125, 0.05, 0.2), "sft": (0.3, 0.2, 0.4), "ddpo": (0.35, 0.25, 0.45),
              "dadpo": (0.45, 0.3, 0.6)}


def make_cache(root, n=40):
    """Pairs whose teacher margin δ_te is 10 + i/4 nats: mean 14.875 over 40 pairs; and two dropped
    pairs (a cut teacher answer) whose margins must not count."""
    cache = open_cache(root, create=True)
    rows = [{"prompt_id": f"p{i:03d}", "chosen_sample": 0, "rejected_sample": 0, "split": "train" if i < 30 else "heldout", "category": "writing",
             "chosen_input_ids": [1, 2, 3], "chosen_prompt_len": 1, "rejected_input_ids": [1, 4], "rejected_prompt_len": 1,
             "ref_chosen_logp": -20.0 - i, "ref_rejected_logp": -15.0 - i, "teacher_chosen_logp": -5.0 - i / 4,
             "teacher_rejected_logp": -15.0 - i / 2, "chosen_tokens": 2, "rejected_tokens": 1,
             "teacher_chosen_tokens": 10, "teacher_rejected_tokens": 5, "chosen_truncated": False,
             "rejected_truncated": False} for i in range(n)]
    rows += [{**rows[0], "prompt_id": f"x{i}", "teacher_chosen_logp": 1e3, "chosen_truncated": True,
              "dropped": "chosen truncated"} for i in range(2)]
    cache.begin_stage("pairs", "fp-pairs", {}, 1)
    written = write_shard(pa.Table.from_pylist(rows, schema=PAIRS), shard_path(cache.stage_dir("pairs", "fp-pairs"), 0),
                          {"stage": "pairs", "fingerprint": "fp-pairs", "shard": 0})
    cache.register("pairs", "fp-pairs", 0, written)
    build_index(cache)
    return cache


def result_rows(shift=0.0):
    rows = []
    for model, score in MTBENCH.items():
        rows.append({"model": model, "suite": "mtbench", "metric": "overall", "value": score + shift, "n": 160, "judge": JUDGE})
        for k, category in enumerate(("coding", "math", "writing")):
            rows.append({"model": model, "suite": "mtbench", "metric": f"category/{category}", "value": score - k,
                         "stderr": 0.25, "n": 20, "judge": JUDGE})
        rows.append({"model": model, "suite": "alpacaeval", "metric": "win_rate", "value": 20.0 + score, "stderr": 1.5,
                     "n": 805, "judge": JUDGE})
        rows.append({"model": model, "suite": "likelihood", "metric": "teacher_logp_per_token", "value": -score / 4, "n": 64})
        rows.append({"model": model, "suite": "lmeval", "metric": "arc_challenge/acc", "value": 0.5 + score / 100, "n": 1172})
    for model, (value, low, high) in VS_TEACHER.items():
        rows.append({"model": model, "suite": "winrate", "metric": "score_vs_teacher", "value": value, "ci_low": low,
                     "ci_high": high, "n": 64, "judge": JUDGE})
    for model in VS_TEACHER:
        rows += [{"model": model, "suite": "winrate", "metric": f"verdicts_{method}_vs_teacher", "value": count, "n": 64,
                  "judge": JUDGE} for method, count in (("logprobs", 100), ("text", 10), ("followup", 16), ("none", 2))]
    rows.append({"model": "dadpo", "suite": "toxicity", "metric": "rate", "value": 0.0625, "n": 64})
    return rows


def save_eval(cache, eval_dir, run_id, rows):
    folder = eval_dir / run_id
    folder.mkdir(parents=True)
    summary = {"run_id": run_id, "models": {m: f"/models/{m}" for m in reversed(ORDER)}, "judge": {"model": "judge-model"}}
    save_results(cache, folder, run_id, rows, summary, f"# Eval {run_id}\n")
    build_index(cache)  # as eval does at its end


def trainer_state(folder, stage, steps=6, beta1=0.1, beta2=0.01):
    """log_history as the Trainer keeps it: one entry per logging step, then the summary entry.

    run.json keeps the manifest's betas; the logged terms use the loss's own (dDPO: β2 = 0).
    """
    folder.mkdir(parents=True)
    used2 = 0.0 if stage == "ddpo" else beta2
    log = []
    for step in range(1, steps + 1):
        entry = {"step": step, "epoch": step / steps, "loss": 1.2 - 0.1 * step, "learning_rate": 5e-7, "grad_norm": 3.0}
        if stage != "sft":
            ref_margin, teacher_margin = 0.5 * step, -40.0 + 2 * step
            entry |= {"ref_margin": ref_margin, "teacher_margin": teacher_margin, "ref_term": beta1 * ref_margin,
                      "teacher_term": used2 * teacher_margin, "rewards/chosen": -0.3 + 0.01 * step,
                      "rewards/rejected": 0.1 - 0.05 * step, "rewards/margins": beta1 * ref_margin + used2 * teacher_margin,
                      "rewards/accuracies": step / steps, "logps/chosen": -120.0, "logps/rejected": -80.0 - step}
        log.append(entry)
    log.append({"step": steps, "train_runtime": 12.5, "train_loss": 0.9})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": log}))
    (folder / "run.json").write_text(json.dumps({"stage": stage, "data": "fp-pairs", "start_model": "/models/sft",
                                                 "loss": stage, "beta1": beta1, "beta2": beta2, "learning_rate": 5e-7}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cache = make_cache(root / "cache")
    save_eval(cache, root / "eval", "20250101-120000-9", result_rows(shift=-1.0))
    save_eval(cache, root / "eval", "20250101-120000-10", result_rows())
    for stage in ("sft", "ddpo", "dadpo"):
        trainer_state(root / "train" / stage, stage)
    return root


@pytest.fixture(scope="module")
def full_report(run_dir):
    return write_report(run_dir)


def table_line(md, model):
    return next(line for line in md.splitlines() if line.startswith(f"| {model} |"))


def test_report_writes_valid_pngs(full_report, run_dir):
    out = run_dir / "report"
    assert sorted(full_report["files"]) == sorted(str(out / n) for n in (
        "report.md", "report.html", "training_curves.png", "teacher_margins.png", "mtbench_categories.png",
        "distillation.png"))
    for name in ("training_curves.png", "teacher_margins.png", "mtbench_categories.png", "distillation.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0.01, name
    assert full_report["missing"] == []


def test_report_table_orders_models_with_newest_eval_numbers(full_report, run_dir):
    """Newest run is -10 (after -9: numeric suffix); lm-eval deltas are vs the student: 0.5 + score/100."""
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Results (eval run 20250101-120000-10)" in md
    lines = [table_line(md, m) for m in ORDER]
    assert [md.index(line) for line in lines] == sorted(md.index(line) for line in lines)
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header == ("| model | MT-Bench | AlpacaEval win % | vs teacher (W+0.5T)/N [95% CI] | teacher log p / token [95% CI] "
                      "| toxicity/rate | arc_challenge/acc |")
    assert table_line(md, "dadpo") == "| dadpo | 6.125 | 26.1 | 0.450 [0.30, 0.60] | -1.531 | 0.062 | 0.561 (+0.026) |"
    assert table_line(md, "student") == "| student | 3.500 | 23.5 | 0.125 [0.05, 0.20] | -0.875 | – | 0.535 |"
    assert table_line(md, "teacher") == "| teacher | 8.000 | 28.0 | – | -2.000 | – | 0.580 (+0.045) |"
    assert f"- mtbench: `{JUDGE}`" in md and "`../eval/20250101-120000-10/report.md`" in md
    assert ("Verdicts read by log-probs / text / follow-up / not at all: winrate/dadpo 100/10/16/2, "
            "winrate/ddpo 100/10/16/2, winrate/sft 100/10/16/2, winrate/student 100/10/16/2.") in md
    for name in ("training_curves.png", "teacher_margins.png", "mtbench_categories.png", "distillation.png"):
        assert f"]({name})" in md


def test_report_training_and_cache_sections(full_report, run_dir):
    """dDPO drops β2: its row shows β2 = 0 though run.json holds 0.01. Final margins at step 6:
    dDPO 0.1·3 = 0.3, daDPO 0.1·3 + 0.01·(−28) = 0.02. δ_te = 10 + i/4 over i < 40 → mean 14.875."""
    md = (run_dir / "report" / "report.md").read_text()
    assert "| ddpo | 0.1 | 0 | 6 | 0.6 | 0.3 | 1 |" in md
    assert "| dadpo | 0.1 | 0.01 | 6 | 0.6 | 0.02 | 1 |" in md
    assert "| sft |  |  | 6 | 0.6 |  |  |" in md
    assert "| learning_rate | 5e-07 | 5e-07 | 5e-07 |" in md
    assert ("- pairs trained on: 40 (heldout 10, train 30); dropped: 2 chosen truncated (pairs.require_finished; "
            "SQL view dropped_pairs)") in md
    assert "- pairs trained on per prompt: mean 0.952, min 0, max 1; policy index (pairs.policy)" in md  # 40 of 42
    assert "mean 14.875, median 14.875 nats per sequence" in md


def test_report_html_is_standalone_and_escaped(full_report, run_dir):
    page = (run_dir / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert page.count('src="data:image/png;base64,') == 4 and ".png\"" not in page
    assert "<td>0.450 [0.30, 0.60]</td>" in page and "<code>judge-model@http://127.0.0.1:8000/v1</code>" in page


def test_report_distillation_plot_compares_models_with_intervals(tmp_path):
    """Likelihood metrics in their fixed order, models in pipeline order, intervals where the row has them;
    the win-rate panel is the graded preference (preferred over (W+0.5T)/N), the teacher absent from it."""
    root = tmp_path / "run"
    rows = [{"model": m, "suite": "likelihood", "metric": "reverse_kl_per_token", "value": 2.0 - k / 2, "ci_low": 1.5 - k / 2,
             "ci_high": 2.5 - k / 2, "n": 16} for k, m in enumerate(["teacher", "dadpo", "student"])]
    rows += [{"model": m, "suite": "likelihood", "metric": "teacher_logp_per_token", "value": v, "n": 16}
             for m, v in (("student", -2.5), ("teacher", -0.5))]
    rows += [{"model": "dadpo", "suite": "winrate", "metric": metric, "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1,
              "n": 16, "judge": JUDGE} for metric, v in (("preference_vs_teacher", 0.4), ("score_vs_teacher", 0.25))]
    rows.append({"model": "dadpo", "suite": "likelihood", "metric": "reverse_kl_per_token_vs_student", "value": 0.5,
                 "ci_low": 0.2, "ci_high": 0.8, "n": 16})  # a paired difference: the plot's second row
    rows.append({"model": "teacher", "suite": "likelihood", "metric": "reverse_kl_per_token_vs_student", "value": -1.0,
                 "ci_low": -1.5, "ci_high": -0.5, "n": 16})  # left out of the second row: it would set its scale
    save_eval(open_cache(root / "cache", create=True), root / "eval", "20250101-120000", rows)
    result = write_report(root)
    out = root / "report"
    assert str(out / "distillation.png") in result["files"]
    image = matplotlib.image.imread(out / "distillation.png")
    assert (out / "distillation.png").read_bytes()[:8] == PNG_MAGIC and image.shape[1] > 3 * image.shape[0] / 2
    assert image.shape[0] > 600  # two rows: the values, then the differences from the student
    assert "![Distillation metrics by model (95% intervals where known)](distillation.png)" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') == 1
    saved = pq.read_table(root / "eval" / "20250101-120000" / "results.parquet").to_pylist()
    assert distillation_panels(saved, ORDER) == [
        ("teacher_logp_per_token", "teacher log p / token (higher: closer)",
         [("student", -2.5, None, None), ("teacher", -0.5, None, None)], []),
        ("reverse_kl_per_token", "reverse KL to teacher / token (lower: closer)",
         [("student", 1.0, 0.5, 1.5), ("dadpo", 1.5, 1.0, 2.0), ("teacher", 2.0, 1.5, 2.5)], [("dadpo", 0.5, 0.2, 0.8)]),
        ("preference_vs_teacher", "P(better than teacher) (judged)", [("dadpo", 0.4, pytest.approx(0.3), 0.5)], [])]


def test_report_without_likelihood_metrics_draws_no_distillation_plot(tmp_path):
    """A judged win rate alone is no distillation comparison: no plot, no stale one, the missing suite named."""
    root = tmp_path / "run"
    rows = [{"model": "dadpo", "suite": "winrate", "metric": "score_vs_teacher", "value": 0.25, "ci_low": 0.1,
             "ci_high": 0.4, "n": 16, "judge": JUDGE}]
    save_eval(open_cache(root / "cache", create=True), root / "eval", "20250101-120000", rows)
    (root / "report").mkdir()
    (root / "report" / "distillation.png").write_bytes(b"from an earlier report")
    result = write_report(root)
    assert not (root / "report" / "distillation.png").exists()
    assert not any(f.endswith("distillation.png") for f in result["files"])
    assert "distillation.png" not in (root / "report" / "report.md").read_text()
    assert any(m.startswith("distillation plot: eval run 20250101-120000 has no likelihood metrics") for m in result["missing"])


def test_report_text_is_escaped_in_both_renderings(tmp_path):
    """A model named like markup stays text in HTML, and a pipe does not split a Markdown cell."""
    blocks = [("p", "judge `a<b>&c`"), ("table", ["model"], [["x|<script>y</script>"]])]
    page = to_html(blocks, tmp_path, "t<i>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "<code>a&lt;b&gt;&amp;c</code>" in page
    assert "<title>t&lt;i&gt;</title>" in page
    assert "| x\\|<script>y</script> |" in to_markdown(blocks)


def test_report_eval_run_option_and_unknown_run(full_report, run_dir, tmp_path):
    """An older eval run on request; the plots of the same training logs and cache are byte-identical."""
    write_report(run_dir, tmp_path / "old", eval_run="20250101-120000-9")
    md = (tmp_path / "old" / "report.md").read_text()
    assert "eval run 20250101-120000-9" in md and table_line(md, "dadpo").startswith("| dadpo | 5.125 |")
    for name in ("training_curves.png", "teacher_margins.png"):
        assert (tmp_path / "old" / name).read_bytes() == (run_dir / "report" / name).read_bytes()
    with pytest.raises(InputError, match="runs: 20250101-120000-9, 20250101-120000-10"):
        write_report(run_dir, tmp_path / "x", eval_run="nope")
    assert sorted(["20250101-120000-10", "20250101-120000-9", "20250101-120000"], key=run_order)[-1] == "20250101-120000-10"


def test_report_of_partial_run_lists_what_is_missing(tmp_path):
    """Only a cache: the margins plot and cache stats, no crash, the next commands named, no stale plot kept."""
    make_cache(tmp_path / "run" / "cache")
    out = tmp_path / "run" / "report"
    out.mkdir()
    (out / "training_curves.png").write_bytes(b"from an earlier report")
    result = write_report(tmp_path / "run")
    assert sorted(result["files"]) == sorted(str(out / n) for n in ("report.md", "report.html", "teacher_margins.png"))
    assert not (out / "training_curves.png").exists()
    assert any("dadpo-offline train" in m for m in result["missing"])
    assert any("dadpo-offline eval" in m for m in result["missing"])
    md = (out / "report.md").read_text()
    assert "## Missing" in md and "## Cache" in md and "## Results" not in md and "## Training" not in md


def test_report_of_broken_parts_does_not_crash(tmp_path):
    """A crashed stage (no trainer_state.json) and an index that is not DuckDB are reported, not raised."""
    (tmp_path / "run" / "train" / "dadpo").mkdir(parents=True)
    (tmp_path / "run" / "cache").mkdir()
    (tmp_path / "run" / "cache" / "index.duckdb").write_text("not a database")
    result = write_report(tmp_path / "run")
    assert [m.split(":")[0] for m in result["missing"]] == ["train/dadpo", "cache", "eval"]
    assert len(result["files"]) == 2


def test_cli_report_prints_report_path(run_dir, tmp_path):
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'r' / 'report.md'}\n"
    assert f"wrote {tmp_path / 'r' / 'report.html'}" in result.stderr


@pytest.mark.parametrize("kind", ["absent", "file", "empty"])
def test_cli_report_rejects_a_folder_that_is_not_a_run(tmp_path, kind):
    target = tmp_path / kind
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    result = CliRunner().invoke(main, ["report", str(target)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "is not a pipeline run folder" in result.output


def test_report_of_a_manifest_finds_train_and_eval_output_dirs_elsewhere(run_dir, tmp_path):
    """train.output_dir and eval.output_dir move those parts out of the run folder: the run's manifest
    leads the report to them, where the run folder alone cannot."""
    import shutil

    moved = tmp_path / "scratch"
    shutil.copytree(run_dir / "train", moved / "train")
    shutil.copytree(run_dir / "eval", moved / "eval")
    shutil.copytree(run_dir / "cache", tmp_path / "run" / "cache")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"cache_dir: run/cache\ntrain: {{output_dir: {moved / 'train'}}}\n"
                        f"eval: {{output_dir: {moved / 'eval'}}}\n", encoding="utf-8")
    alone = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert alone.exit_code == 0 and "missing: training curves" in alone.stderr and "missing: eval:" in alone.stderr
    result = CliRunner().invoke(main, ["report", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "missing:" not in result.stderr
    assert result.stdout == f"{tmp_path / 'run' / 'report' / 'report.md'}\n"
    md = (tmp_path / "run" / "report" / "report.md").read_text(encoding="utf-8")
    assert table_line(md, "dadpo") and "## Training" in md
