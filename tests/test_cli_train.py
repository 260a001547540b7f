"""`dadpo-offline train`: exit codes, stdout summary, outputs; the dSFT model loads in transformers and vLLM."""
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import build_tiny_student
from dadpo_offline.cli import main
from test_cli_precompute import snapshot

QUIET = ["--set", "train.report_to=[]", "--set", "sft.report_to=[]"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sft_dir(tiny_cache, tmp_path_factory):
    """`train --stage sft`: two steps of dSFT on the teacher's responses (other tokenizer → re-templated)."""
    out = tmp_path_factory.mktemp("sft_out")
    result = invoke("train", tiny_cache, "--stage", "sft", "--max-steps", 2, "--output-dir", out, *QUIET)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "sft" and summary["steps"] == 2
    return out / "sft"


def test_train_help_shows_an_example():
    result = invoke("train", "-h")
    assert result.exit_code == 0
    assert "dadpo-offline train manifests/demo.yaml --stage sft" in result.output
    assert "--beta2" in result.output


def test_train_rejects_an_unknown_loss_at_parse_time(tiny_cache):
    result = invoke("train", tiny_cache, "--loss", "ipo")
    assert result.exit_code == 2
    assert "'ipo' is not one of 'dadpo', 'ddpo', 'rdpo'" in result.output


def test_train_reports_every_bad_setting_at_once(tiny_cache):
    result = invoke("train", tiny_cache, "--beta1", -1, "--set", "train.micro_batch_size=0")
    assert result.exit_code == 1
    assert "train.micro_batch_size must be >= 1, got 0" in result.output
    assert "train.beta1 must be >= 0, got -1.0" in result.output
    assert "Traceback" not in result.output


def test_train_dadpo_writes_model_metrics_and_tensorboard(tiny_cache, tmp_path):
    result = invoke("train", tiny_cache, "--loss", "ddpo", "--beta1", 0.5, "--max-steps", 1, "--output-dir", tmp_path,
                    "--set", "train.micro_batch_size=2", "--set", "train.batch_size=2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip())  # stdout holds only the summary line
    assert summary["stage"] == "ddpo" and summary["steps"] == 1 and summary["resumed_from"] is None
    # dDPO at step 0: policy = reference, so z = 0 and the loss is exactly log 2
    assert summary["train_loss"] == pytest.approx(0.693147, abs=1e-4)
    assert "step-0 check over 16 sequences" in result.stderr
    out = tmp_path / "ddpo"
    assert (out / "model.safetensors").is_file() and (out / "manifest.yaml").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"


def test_train_stops_when_the_policy_is_not_the_cached_reference(tiny_cache, smollm2_dir, tmp_path):
    wrong = build_tiny_student(tmp_path / "other", smollm2_dir, seed=2)
    result = invoke("train", tiny_cache, "--output-dir", tmp_path, "--set", f"train.init_model={wrong}", *QUIET)
    assert result.exit_code == 1
    assert "Error: step-0 check" in result.output and "dadpo-offline precompute MANIFEST --stage score" in result.output


def test_sft_output_is_a_model_directory_with_card_and_template(sft_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert model.config.vocab_size == len(tok)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    card = (sft_dir / "README.md").read_text()
    assert "examples: 12" in card and "sft.learning_rate" in card
    assert (sft_dir / "manifest.yaml").is_file()


def test_trained_outputs_and_checkpoints_have_the_users_file_mode(sft_dir):
    """transformers writes weights as 600; a shared run folder needs the umask's mode (usually 644)."""
    from dadpo_offline.files import current_umask

    mask = current_umask()
    files = [f for f in sft_dir.rglob("*") if f.is_file()]
    assert any(f.parent.name.startswith("checkpoint-") and f.name == "model.safetensors" for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}


def test_sft_output_loads_with_vllm(sft_dir):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(sft_dir), dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
              max_model_len=256)
    try:
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        del llm


def test_train_under_accelerate_launch_with_two_processes(tiny_cache, tmp_path):
    """Real multi-process DDP (gloo on the CPU): both ranks train to the end, rank 0 alone prints the summary."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dadpo_offline",
               "train", str(tiny_cache), "--max-steps", "2", "--output-dir", str(tmp_path), "--set",
               "train.batch_size=4", "--set", "train.micro_batch_size=2", *QUIET]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2
    assert (tmp_path / "dadpo" / "model.safetensors").is_file()


def test_train_refuses_to_resume_a_run_made_with_other_settings(tiny_cache, tmp_path):
    """A sweep into one folder must not 'resume' the finished first run under the second run's betas."""
    common = ["train", tiny_cache, "--max-steps", 1, "--output-dir", tmp_path, "--set", "train.batch_size=2",
              "--set", "train.micro_batch_size=2", *QUIET]
    assert invoke(*common, "--beta1", 0.1).exit_code == 0
    refused = invoke(*common, "--beta1", 1.0)
    assert refused.exit_code == 1
    assert "holds checkpoints of a run with other beta1" in refused.output and "--no-resume" in refused.output
    assert invoke(*common, "--beta1", 1.0, "--no-resume").exit_code == 0
    assert json.loads((tmp_path / "dadpo" / "run.json").read_text())["beta1"] == 1.0


def test_dsft_identity_is_its_own_settings_and_the_students_weights(tiny_cache, tiny_student, tmp_path):
    """daDPO-only settings leave a finished dSFT alone; new weights in the same student folder (a
    student re-pruned in place) are another run."""
    from safetensors.torch import load_file, save_file

    student = shutil.copytree(tiny_student, tmp_path / "student")
    common = ["train", tiny_cache, "--stage", "sft", "--max-steps", 1, "--output-dir", tmp_path / "out",
              "--set", f"student.model={student}", *QUIET]
    first = invoke(*common)
    assert first.exit_code == 0, first.output
    again = json.loads(invoke(*common, "--set", "train.learning_rate=1e-3", "--set", "train.epochs=3",
                              "--beta1", 0.5).stdout.strip().splitlines()[-1])
    assert again["skipped"] == "finished before with the same settings"
    weights = load_file(student / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, student / "model.safetensors", metadata={"format": "pt"})
    refused = invoke(*common)  # not "finished before": the weights it started from are others now
    assert refused.exit_code == 1 and "holds checkpoints of a run with other start_revision" in refused.output
    repruned = json.loads(invoke(*common, "--no-resume").stdout.strip().splitlines()[-1])
    assert "skipped" not in repruned and repruned["steps"] == 1


def test_a_finished_stage_is_skipped_only_when_rerun_with_the_same_settings(tiny_cache, tmp_path):
    def train(*flags):
        result = invoke("train", tiny_cache, "--stage", "sft", "--output-dir", tmp_path, *QUIET, *flags)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert train("--max-steps", 1)["steps"] == 1
    again = train("--max-steps", 1)
    assert again["skipped"] == "finished before with the same settings" and again["steps"] == 1
    longer = train("--max-steps", 2)  # a smoke run is not the full run: continue it
    assert "skipped" not in longer and longer["steps"] == 2
    assert "skipped" not in train("--max-steps", 2, "--no-resume")


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    """A private copy of the tiny cache and its manifest, for a test to damage."""
    from dadpo_offline.manifest import load_manifest

    original = load_manifest(tiny_cache).cache_dir
    shutil.copytree(original, tmp_path / "cache")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(tiny_cache.read_text().replace(str(original), str(tmp_path / "cache")))
    assert invoke("cache", "status", tmp_path / "cache").exit_code == 0  # the first open of a moved copy settles its views
    return manifest, tmp_path / "cache"


@pytest.mark.parametrize("stage, damage, stage_dir", [
    ("sft", "truncate", "generate-teacher"), ("sft", "delete", "generate-student"),
    ("dadpo", "truncate", "pairs"), ("dadpo", "delete", "pairs"), ("dadpo", "overwrite", "score-reference"),
])
def test_train_on_a_damaged_cache_names_the_shard_and_the_repair(cache_copy, tmp_path, stage, damage, stage_dir):
    """Registered shards checked against their recorded size and checksum before training reads them:
    one Error line naming the shard, `cache verify` and the precompute step, nothing written anywhere."""
    manifest, cache = cache_copy
    shard = sorted((cache / stage_dir).rglob("shard-00000.parquet"))[0]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "delete":
        shard.unlink()
    else:  # same size, other bytes
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = snapshot(cache)
    result = invoke("train", manifest, "--stage", stage, "--output-dir", tmp_path / "out", "--max-steps", 1, *QUIET)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors == result.output.strip().splitlines()[-1:]
    producer = "generate" if stage == "sft" else "score"
    assert errors[0].startswith(f"Error: damaged cache: {stage_dir} shard 0 ")
    assert f"dadpo-offline cache verify {cache}" in errors[0]
    assert f"dadpo-offline precompute MANIFEST --stage {producer}" in errors[0]
    assert snapshot(cache) == before
    assert not (tmp_path / "out" / stage / "model.safetensors").exists()
