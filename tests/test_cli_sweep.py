"""`dadpo-offline sweep`: a grid of real (tiny) preference runs from one cache, skipped when finished,
resumed after a kill, evaluated once (teacher likelihood, real transformers engine), tabulated and plotted.

The cache is a private copy of `tiny_cache` (the eval writes answers into it), rescored with a quick
dSFT as the reference, as `run` would.
"""
import csv
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dadpo_offline.cli import main
from dadpo_offline.manifest import load_manifest
from test_cli_precompute import snapshot

SETTINGS = ["train.report_to=[]", "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=2",
            "train.save_steps=1", "train.learning_rate=0.001", "train.warmup_ratio=0", "train.step0_pairs=2",
            "eval.winrate.limit=2", "eval.winrate.max_tokens=6"]
GRID = ["--loss", "dadpo,ddpo", "--beta1", "0.1", "--beta2", "0,0.5", "--seeds", "1,2"]
POINTS = ["dadpo-b1_0.1-b2_0-seed_1", "dadpo-b1_0.1-b2_0-seed_2", "dadpo-b1_0.1-b2_0.5-seed_1",
          "dadpo-b1_0.1-b2_0.5-seed_2", "ddpo-b1_0.1-b2_0-seed_1", "ddpo-b1_0.1-b2_0-seed_2"]  # ddpo: no β2 axis


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sweep_manifest(tiny_cache, tmp_path_factory):
    """The tiny cache's manifest on a private cache copy, made ready as `run` makes it: dSFT (a few quick
    steps, so that its greedy answers are words, not the random student's newlines), then the reference
    scored with it. The sweep then starts every point from the dSFT output."""
    base = tmp_path_factory.mktemp("sweep")
    original = load_manifest(tiny_cache).cache_dir
    shutil.copytree(original, base / "cache")
    manifest = base / "manifest.yaml"
    manifest.write_text(tiny_cache.read_text().replace(str(original), str(base / "cache")))
    assert invoke("cache", "status", base / "cache").exit_code == 0  # a moved copy's first open settles its views
    sft = invoke("train", manifest, "--stage", "sft", "--max-steps", 6, "--set", "sft.report_to=[]", "--set",
                 "sft.learning_rate=0.01", "--set", "sft.warmup_ratio=0", "--set", "sft.batch_size=4")
    assert sft.exit_code == 0, sft.output
    scored = invoke("precompute", manifest, "--stage", "score", "--set", f"reference.model={base / 'train' / 'sft'}")
    assert scored.exit_code == 0, scored.output
    return manifest, [arg for s in SETTINGS for arg in ("--set", s)]


@pytest.fixture(scope="module")
def swept(sweep_manifest):
    manifest, settings = sweep_manifest
    result = invoke("sweep", manifest, *GRID, *settings)
    assert result.exit_code == 0, result.output
    return manifest.parent / "sweep", result


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_sweep_trains_every_point_once_evaluates_them_and_writes_table_and_plots(swept):
    out, result = swept
    assert sorted(p.name for p in (out / "points").iterdir()) == POINTS
    for name in POINTS:
        loss, b1, b2, seed = name.replace("-b1_", " ").replace("-b2_", " ").replace("-seed_", " ").split()
        identity = json.loads((out / "points" / name / "run.json").read_text())
        assert (identity["stage"], identity["beta1"], identity["beta2"], identity["seed"]) == (loss, float(b1),
                                                                                                 float(b2), int(seed))
        assert f"== {name}: 2 steps" in result.stderr
    # β2 = 0 makes daDPO's z exactly dDPO's: same seed, same weights; another seed, another data order
    same, other = weights(out / "points" / POINTS[0]), weights(out / "points" / POINTS[5])
    assert all(torch.equal(same[k], weights(out / "points" / POINTS[4])[k]) for k in same)
    assert any(not torch.equal(same[k], weights(out / "points" / POINTS[1])[k]) for k in same)
    assert any(not torch.equal(other[k], weights(out / "points" / POINTS[2])[k]) for k in other)
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["point"] for row in table] == POINTS and table[2]["beta2"] == "0.5" and table[4]["loss"] == "ddpo"
    logp = [float(row["likelihood/teacher_logp_per_token"]) for row in table]
    assert all(value < 0 for value in logp)
    shifts = [(float(row["displacement/chosen_logp_shift_per_token"]), float(row["displacement/rejected_logp_shift_per_token"]))
              for row in table]
    assert shifts[0] == shifts[4] and shifts[1] == shifts[5]  # same weights, same shift
    assert all(chosen != 0 and rejected != 0 for chosen, rejected in shifts)
    answered = invoke("sql", out.parent / "cache", "SELECT DISTINCT model FROM answers", "-f", "json")
    assert {row["model"] for row in json.loads(answered.stdout)} == {*POINTS, "teacher", "student", "sft"}
    md = (out / "sweep.md").read_text()
    assert sum(line.startswith(f"| {name} | ") for name in POINTS for line in md.splitlines()) == len(POINTS)
    assert "## Baselines" in md and "| teacher |" in md and "| sft |" in md
    for metric in ("teacher_logp_per_token", "teacher_logp_per_answer"):
        png = out / "plots" / f"likelihood_{metric}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"(plots/{png.name})" in md
    assert result.stdout == md  # stdout is the table; progress went to stderr
    # daDPO at β2 = 0 has dDPO's weights, seed by seed: every difference from dDPO is exactly 0
    versus = md.split("## Minus dDPO with the same seed")[1].split("\n\n")[1].splitlines()
    zero = next(line for line in versus if line.startswith("| dadpo | 0.1 | 0 | 2 | "))
    assert set(zero.split(" | ")[4:-1] + [zero.split(" | ")[-1].rstrip(" |")]) == {"+0.000 [+0.000, +0.000]"}, zero
    assert any(line.startswith("| dadpo | 0.1 | 0.5 | 2 | ") for line in versus)


def test_the_likelihood_shift_equals_a_plain_full_forward_against_the_cached_reference(swept, sweep_manifest):
    """The sweep's displacement columns, recomputed independently: a full-vocabulary log_softmax over every
    position, masked to the response, minus the reference's log-probs as the `pairs` view stores them."""
    from transformers import AutoModelForCausalLM

    out, _ = swept
    manifest, _ = sweep_manifest
    point = out / "points" / POINTS[2]
    model = AutoModelForCausalLM.from_pretrained(point, dtype=torch.float32).eval()
    pairs = json.loads(invoke("sql", manifest.parent / "cache", "SELECT chosen_input_ids, chosen_prompt_len, "
                              "rejected_input_ids, rejected_prompt_len, ref_chosen_logp, ref_rejected_logp FROM pairs "
                              "WHERE split = 'train'", "-f", "json").stdout)
    expected = {}
    for side in ("chosen", "rejected"):
        per_token = []
        for pair in pairs:
            ids, start = torch.tensor([pair[f"{side}_input_ids"]]), pair[f"{side}_prompt_len"]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            per_token.append((logp[start - 1:].sum().item() - pair[f"ref_{side}_logp"]) / (ids.shape[1] - start))
        expected[side] = sum(per_token) / len(per_token)
    kept = json.loads((point / "likelihood_shift.json").read_text())
    assert kept["run"] == json.loads((point / "run.json").read_text()) and kept["metrics"]["pairs"] == len(pairs)
    for side in ("chosen", "rejected"):
        assert kept["metrics"][f"{side}_logp_shift_per_token"] == pytest.approx(expected[side], abs=1e-4)


def test_a_second_sweep_skips_every_point_and_reuses_the_cached_answers(swept, sweep_manifest):
    out, _ = swept
    manifest, settings = sweep_manifest
    before = {name: (out / "points" / name / "model.safetensors").stat().st_mtime_ns for name in POINTS}
    answers = snapshot(manifest.parent / "cache" / "answers")
    again = invoke("sweep", manifest, *GRID, *settings)
    assert again.exit_code == 0, again.output
    assert again.stderr.count("skipped (finished before with the same settings)") == len(POINTS)
    assert "step 1:" not in again.stderr  # no training step anywhere
    assert "likelihood shift" not in again.stderr  # each point's shift is read back, no model loaded
    assert {name: (out / "points" / name / "model.safetensors").stat().st_mtime_ns for name in POINTS} == before
    assert snapshot(manifest.parent / "cache" / "answers") == answers
    dry = invoke("sweep", manifest, *GRID, *settings, "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count(" finished\n") == len(POINTS)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from dadpo_offline.manifest import load_manifest
    from dadpo_offline.sweep.run import run_sweep

    class KillAtStep2(TrainerCallback):  # checkpoint-1 of the first point is complete, step 2 done but not saved
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    run_sweep(load_manifest(sys.argv[1], sys.argv[2:]), evaluate_points=False, callbacks=[KillAtStep2()])
""")


def test_a_killed_sweep_resumes_its_point_and_ends_with_the_uninterrupted_weights(swept, sweep_manifest, tmp_path):
    out, _ = swept
    manifest, settings = sweep_manifest
    grid = ["sweep.losses=[dadpo]", "sweep.beta1=[0.1]", "sweep.beta2=[0,0.5]", "sweep.seeds=[1]",
            f"sweep.output_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(manifest), *SETTINGS, *grid], capture_output=True,
                          text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first, second = POINTS[0], POINTS[2]
    assert (tmp_path / "points" / first / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (tmp_path / "points" / first / "model.safetensors").exists()
    flags = [arg for s in grid for arg in ("--set", s)]
    dry = invoke("sweep", manifest, *settings, *flags, "--dry-run")
    listed = dict(line.split(maxsplit=1) for line in dry.stdout.splitlines()[1:-1])
    assert listed == {first: "started (checkpoint-1)", second: "to train"}
    resumed = invoke("sweep", manifest, *settings, *flags, "--no-eval")
    assert resumed.exit_code == 0, resumed.output
    assert f"== {first}: 2 steps, train loss" in resumed.stderr and "resumed from checkpoint-1" in resumed.stderr
    for name in (first, second):
        a, b = weights(tmp_path / "points" / name), weights(out / "points" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert "No eval in this sweep run" in (tmp_path / "sweep.md").read_text()


def test_sweep_without_a_reference_names_the_dsft_step(tiny_cache, tmp_path):
    result = invoke("sweep", tiny_cache, "--output-dir", tmp_path / "s", "--no-eval", "--set",
                    f"train.output_dir={tmp_path / 'train'}")
    assert result.exit_code == 1
    assert result.output.startswith("Error: sweep trains every point from the dSFT reference")
    assert "dadpo-offline train MANIFEST --stage sft" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_sweep_leaves_out_a_point_without_an_anchor_and_refuses_an_empty_grid(tiny_cache):
    dry = invoke("sweep", tiny_cache, "--loss", "rdpo,dadpo", "--beta1", "0.1", "--beta2", "0,1", "--dry-run")
    assert dry.exit_code == 0, dry.output
    listed = [line.split()[0] for line in dry.stdout.splitlines()[1:-1] if not line.strip().startswith("(")]
    assert listed == ["rdpo-b1_0-b2_1-seed_42", "dadpo-b1_0.1-b2_0-seed_42", "dadpo-b1_0.1-b2_1-seed_42"]
    assert "(rdpo at β1=0, β2=0: no anchor (needs a positive beta2), not trained)" in dry.stdout
    own = invoke("sweep", tiny_cache, "--loss", "rdpo,dadpo", "--beta1", "0.1", "--beta2", "0,1", "--dry-run",
                 "--set", "sweep.axes={rdpo: {beta2: [0.1]}}")  # rDPO's β2 held at one value, daDPO's swept
    listed = [line.split()[0] for line in own.stdout.splitlines()[1:-1] if not line.strip().startswith("(")]
    assert listed == ["rdpo-b1_0-b2_0.1-seed_42", "dadpo-b1_0.1-b2_0-seed_42", "dadpo-b1_0.1-b2_1-seed_42"], own.output
    bad = invoke("sweep", tiny_cache, "--dry-run", "--set", "sweep.axes={dpo: {beta3: [-1]}}")
    assert bad.exit_code == 1 and "sweep.axes: 'dpo' is not one of" in bad.output
    assert "sweep.axes.dpo.beta3: only beta1 and beta2 have per-loss axes" in bad.output
    empty = invoke("sweep", tiny_cache, "--loss", "ddpo", "--beta1", "0", "--dry-run")
    assert empty.exit_code == 1 and "every point lacks an anchor" in empty.output


def test_sweep_table_gives_each_point_minus_the_ddpo_point_of_its_seed(tmp_path):
    """Hand-worked: daDPO β2=1 seeds 1, 2 have KL 0.5, 0.9; dDPO seeds 1, 2 have 0.7, 0.8 → differences
    −0.2, +0.1: mean −0.05, min −0.2, max +0.1. rDPO (no β1) is matched to the one dDPO β1 swept."""
    from dadpo_offline.sweep.run import Point
    from dadpo_offline.sweep.table import write_tables

    kl = {Point("dadpo", 0.1, 1.0, 1): 0.5, Point("dadpo", 0.1, 1.0, 2): 0.9, Point("ddpo", 0.1, 0.0, 1): 0.7,
          Point("ddpo", 0.1, 0.0, 2): 0.8, Point("rdpo", 0.0, 0.1, 1): 1.0}
    trained = [(point, {"steps": 1, "train_loss": 0.5}) for point in kl]
    rows = [{"model": p.name, "suite": "likelihood", "metric": "reverse_kl_per_token", "value": v} for p, v in kl.items()]
    write_tables(tmp_path, trained, rows)
    md = (tmp_path / "sweep.md").read_text()
    assert "| dadpo | 0.1 | 1 | 2 | -0.050 [-0.200, +0.100] |" in md
    assert "| rdpo | 0 | 0.1 | 1 | +0.300 [+0.300, +0.300] |" in md
    assert "| ddpo |" not in md.split("## Minus dDPO")[1]
