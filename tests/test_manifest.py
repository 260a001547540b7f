import pytest
import yaml

from dadpo_offline.errors import ManifestError
from dadpo_offline.manifest import Manifest, load_manifest, write_resolved


def test_manifest_defaults_without_file():
    m = load_manifest(None)
    assert m.teacher == Manifest().teacher and m.cache_dir.endswith("runs/default/cache")
    assert m.reference_model == m.student


def test_manifest_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher: {model: 3, colour: red}\nbogus: 1\ngenerate: {samples_per_prompt: two}\n"
                    "engine: {backend: tpu}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert message.startswith(str(path))
    for fragment in ["unknown key teacher.colour", "teacher.model: expected str", "unknown key bogus",
                     "generate.samples_per_prompt: expected int", "engine.backend: 'tpu' is not one of"]:
        assert fragment in message


def test_manifest_rejects_bad_combinations(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("prompts: {sources: [{builtin: train, jsonl: x.jsonl}]}\nengine: {shard_size: 0}\n")
    with pytest.raises(ManifestError, match=r"sources\[0\]: give exactly one of.*shard_size: must be >= 1"):
        load_manifest(path)


def test_manifest_overrides_keep_types_and_win_over_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("generate: {teacher: {temperature: 0.5}}\n")
    m = load_manifest(path, ["generate.teacher.temperature=0", "engine.shard_size=8", "train.beta2=0.1"])
    assert m.generate.teacher.temperature == 0.0 and isinstance(m.generate.teacher.temperature, float)
    assert m.engine.shard_size == 8 and m.train.beta2 == 0.1


def test_manifest_override_with_unknown_key_is_rejected():
    with pytest.raises(ManifestError, match="unknown key generate.teachr"):
        load_manifest(None, ["generate.teachr.temperature=0"])


def test_manifest_cache_dir_resolves_against_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.yaml"
    path.write_text("cache_dir: ../c\n")
    assert load_manifest(path).cache_dir == str((tmp_path / "c").resolve())


def test_manifest_not_yaml_or_missing_is_one_line_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "absent.yaml")


def test_resolved_manifest_round_trips(tmp_path):
    m = load_manifest(None, ["train.beta1=0.5", "name=x"])
    write_resolved(m, tmp_path / "resolved.yaml")
    text = (tmp_path / "resolved.yaml").read_text()
    assert text.startswith("# resolved manifest")
    assert load_manifest(tmp_path / "resolved.yaml") == m
    assert yaml.safe_load(text)["train"]["beta1"] == 0.5


def test_manifest_reads_exponent_floats_without_a_dot(tmp_path):
    """PyYAML follows YAML 1.1, where `5e-7` is a string; learning rates are written that way."""
    path = tmp_path / "m.yaml"
    path.write_text("train: {learning_rate: 5e-7}\n")
    m = load_manifest(path, ["train.beta2=1e-3"])
    assert m.train.learning_rate == 5e-7 and m.train.beta2 == 0.001
    with pytest.raises(ManifestError, match="train.beta1: expected float, got str 'high'"):
        load_manifest(path, ["train.beta1=high"])


def test_manifest_prompt_files_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    path = tmp_path / "runs" / "m.yaml"
    path.write_text("prompts: {sources: [{jsonl: data/p.jsonl}, {builtin: heldout}]}\n")
    sources = load_manifest(path).prompts.sources
    assert sources[0].jsonl == str(tmp_path / "runs" / "data" / "p.jsonl") and sources[1].builtin == "heldout"


def test_manifest_override_that_is_not_yaml_is_one_problem():
    with pytest.raises(ManifestError, match=r"override name: value '\[' is not valid YAML"):
        load_manifest(None, ["name=["])


def test_manifest_checks_every_setting_it_alone_can_show_wrong():
    """Sampling, eval and prune settings that would fail minutes into a run fail the load, all named at once."""
    with pytest.raises(ManifestError) as error:
        load_manifest(None, ["generate.teacher.top_p=0", "generate.student.temperature=-1", "eval.judge.concurrency=0",
                             "prune.calibration_prompts=0", "eval.winrate.limit=0", "sft.learning_rate=0",
                             "eval.lmeval.data_files={ifeval: {test: x.jsonl}}"])
    message = str(error.value)
    for expected in ("generate.teacher.top_p: must be in (0, 1], got 0", "generate.student.temperature: must be >= 0",
                     "eval.judge.concurrency: must be >= 1, got 0", "prune.calibration_prompts: must be >= 1, got 0",
                     "eval.winrate.limit: must be >= 1, got 0", "sft.learning_rate must be > 0, got 0",
                     "eval.lmeval.data_files.ifeval: ifeval is not in eval.lmeval.tasks"):
        assert expected in message


def test_judge_logprobs_is_a_switch():
    assert load_manifest(None, ["eval.judge.logprobs=false"]).eval.judge.logprobs is False
    with pytest.raises(ManifestError, match="eval.judge.logprobs: expected bool, got str 'maybe'"):
        load_manifest(None, ["eval.judge.logprobs=maybe"])


def test_peft_sections_load_per_stage_and_round_trip(tmp_path):
    """`sft.peft` and `train.peft` are independent; target_modules is a list of names or the one string all-linear."""
    m = load_manifest(None, ["sft.peft.rank=8", "train.peft={}", "train.peft.target_modules=[q_proj, v_proj]"])
    assert (m.sft.peft.rank, m.sft.peft.target_modules) == (8, "all-linear")
    assert (m.train.peft.rank, m.train.peft.target_modules) == (16, ["q_proj", "v_proj"])
    assert load_manifest(None).sft.peft is None
    write_resolved(m, tmp_path / "resolved.yaml")
    assert load_manifest(tmp_path / "resolved.yaml") == m


def test_peft_settings_are_checked_at_load_one_line_naming_each_key():
    """This machine has no CUDA GPU, so QLoRA (quantize: 4bit) is refused at load, not after phase one."""
    import torch

    assert not torch.cuda.is_available()
    with pytest.raises(ManifestError) as error:
        load_manifest(None, ["sft.peft.rank=0", "sft.peft.alpha=0", "train.peft.dropout=1",
                             "train.peft.target_modules=attention", "train.peft.quantize=4bit"])
    message = str(error.value)
    assert "\n" not in message
    for expected in ("sft.peft.rank must be >= 1, got 0", "sft.peft.alpha must be > 0, got 0",
                     "train.peft.dropout must be in [0, 1), got 1", "train.peft.target_modules must be a list of "
                     "module names or 'all-linear', got 'attention'", "train.peft.quantize=4bit (QLoRA) needs a CUDA GPU"):
        assert expected in message
    with pytest.raises(ManifestError, match="sft.peft.target_modules: expected a list, got int"):
        load_manifest(None, ["sft.peft.target_modules=3"])
