"""`dadpo-offline run`: the whole pipeline, shortened (prune → … → report), a no-op rerun, and --dry-run."""
import json
import re
from pathlib import Path

from conftest import write_manifest
from test_cli_precompute import invoke


def pipeline_manifest(tmp_path, prompts_file, judge_server):
    """The demo's shape at test size: SmolLM2 pruned by 20% as the student, 6 prompts, 12-token answers.

    The transformers engine: the pipeline loads five models for generation, scoring and eval, and a
    vLLM start costs 15-45 s on 2 cores each time. vLLM's own paths have their own tests
    (test_precompute, test_cli_eval); `make demo` runs this pipeline on vLLM."""
    path = write_manifest(tmp_path, prompts_file, tmp_path / "run" / "cache", student=tmp_path / "run" / "student",
                          shard_size=3, max_tokens=12, backend="transformers")
    path.write_text(path.read_text() + f"""\
prune: {{source: embedded:smollm2-135m-instruct, ratio: 0.2, calibration_prompts: 2}}
sft: {{batch_size: 2, micro_batch_size: 2, save_steps: 1, report_to: []}}
train: {{batch_size: 2, micro_batch_size: 2, learning_rate: 1.0e-5, save_steps: 1, report_to: [], step0_pairs: 2}}
eval:
  suites: [winrate, likelihood]
  judge: {{base_url: "{judge_server['base_url']}", model: {judge_server['model']}, max_tokens: 24, concurrency: 4}}
  winrate: {{limit: 3, max_tokens: 12}}
  likelihood: {{samples: 2, max_tokens: 12}}
""", encoding="utf-8")
    return path


def test_run_chains_every_step_and_a_rerun_redoes_nothing(tmp_path, prompts_file, judge_server):
    manifest = pipeline_manifest(tmp_path, prompts_file, judge_server)
    result = invoke("run", manifest)
    assert result.exit_code == 0, result.output
    steps = [line.split()[0] for line in result.stdout.strip().splitlines()]
    assert steps == ["prune", "generate", "dsft", "score", "dadpo", "ddpo", "eval", "report", "total"]
    run = tmp_path / "run"
    assert json.loads((run / "student" / "prune.json").read_text())["layers_after"] == 24
    for stage in ("sft", "dadpo", "ddpo"):
        assert (run / "train" / stage / "trainer_state.json").is_file()
    summary = json.loads(next((run / "eval").glob("*/summary.json")).read_text())
    assert set(summary["models"]) == {"teacher", "student", "sft", "dadpo", "ddpo"}
    likelihood = {r["model"]: r["value"] for r in summary["results"] if r["metric"] == "teacher_logp_per_token"}
    assert set(likelihood) == set(summary["models"]) and all(v < 0 for v in likelihood.values())
    kl = {r["model"]: r["value"] for r in summary["results"] if r["metric"] == "reverse_kl_per_token"}
    assert set(kl) == set(summary["models"]) and kl["teacher"] == 0
    scored = {r["model"] for r in summary["results"] if r["metric"] == "score_vs_teacher"}
    assert scored == {"student", "sft", "dadpo", "ddpo"}
    report = (run / "report" / "report.md").read_text()
    assert "| student |" in report and "| dadpo |" in report and (run / "report" / "report.html").is_file()

    again = invoke("run", manifest)
    assert again.exit_code == 0, again.output
    detail = {line.split()[0]: line for line in again.stdout.strip().splitlines()}
    for stage in ("generate", "score"):
        assert set(re.findall(r"built (\d+)", detail[stage])) == {"0"}, detail[stage]
    for stage in ("dsft", "dadpo", "ddpo"):
        assert "finished before with the same settings" in detail[stage]
    assert len(list((run / "eval").iterdir())) == 2  # a new results folder, from cached answers and judgments

    through = invoke("run", manifest, "--through", "score")  # what a sweep trains from, and nothing after it
    assert through.exit_code == 0, through.output
    assert [line.split()[0] for line in through.stdout.strip().splitlines()] == ["prune", "generate", "dsft", "score", "total"]
    assert len(list((run / "eval").iterdir())) == 2
    unknown = invoke("run", manifest, "--through", "scores")
    assert unknown.exit_code == 1 and len(unknown.output.strip().splitlines()) == 1
    assert "--through scores: no such step (this manifest's steps: prune, generate, dsft, score, dadpo, ddpo, eval, report)" in unknown.output


def test_run_dry_run_plans_every_step_without_models(tmp_path, prompts_file):
    manifest = pipeline_manifest(tmp_path, prompts_file, {"base_url": "http://127.0.0.1:1/v1", "model": "j"})
    result = invoke("run", manifest, "--dry-run")
    assert result.exit_code == 0, result.output
    for stage in ("prune", "generate-student", "train-sft", "score-reference", "train-dadpo", "train-ddpo", "eval", "report"):
        assert stage in result.stdout
    assert not (tmp_path / "run").exists()


def test_run_with_a_bad_batch_size_fails_before_any_work(tmp_path):
    """Settings the manifest alone shows wrong fail its load: no prune, no cache, no phase one spent first."""
    import shutil
    import time

    manifest = tmp_path / "manifests" / "demo.yaml"
    manifest.parent.mkdir()
    shutil.copy(Path(__file__).parents[1] / "manifests" / "demo.yaml", manifest)
    start = time.perf_counter()
    result = invoke("run", manifest, "--set", "train.batch_size=6", "--set", "sft.micro_batch_size=0")
    seconds = time.perf_counter() - start
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "train.batch_size=6 is not a multiple of train.micro_batch_size=4" in result.output
    assert "sft.micro_batch_size must be >= 1, got 0" in result.output
    assert not (tmp_path / "runs").exists(), f"work was done before the error ({seconds:.1f} s)"
