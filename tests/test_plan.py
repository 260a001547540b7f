"""`plan` / `format_plan` (what `run --dry-run` prints): offline, no model opened, plausible numbers.

Every YAML file in manifests/ is covered by glob, so a new shipped manifest is checked as it lands.
"""
import builtins
import io
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dadpo_offline.errors import ManifestError
from dadpo_offline.manifest import load_manifest
from dadpo_offline.plan import KNOWN, UNKNOWN_PROMPTS, describe_model, format_plan, param_counts, plan

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted((ROOT / "manifests").glob("*.yaml"))
RUN_MANIFESTS = [p for p in YAMLS if p.read_text(encoding="utf-8").startswith("# dadpo-offline run")]
WEIGHT_FILES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
PRECOMPUTE = ["prompts", "generate-student", "generate-teacher", "train-sft", "score-teacher", "score-reference", "pairs"]


def refuse(*args, **kwargs):
    raise AssertionError("plan opened model weights or an engine")


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to load weights, open an engine, convert the embedded model or fetch data fails the test."""
    import datasets
    import huggingface_hub
    import safetensors
    import transformers

    from dadpo_offline.core import models
    from dadpo_offline.core import engines

    for cls in (transformers.AutoModelForCausalLM, transformers.PreTrainedModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    for cls in (engines.VllmEngine, engines.TransformersEngine):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(models, "_convert_gguf", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    for module in (builtins, io):  # pathlib opens through io.open
        real = module.open
        monkeypatch.setattr(module, "open", lambda file, *a, _real=real, **k: refuse() if str(file).endswith(
            WEIGHT_FILES) else _real(file, *a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_no_models_fixture_refuses_weight_files(tmp_path, no_models):
    weights = tmp_path / "model.safetensors"
    with pytest.raises(AssertionError):
        weights.write_bytes(b"")
    with pytest.raises(AssertionError):
        open(tmp_path / "model.gguf", "wb")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def stage(p: dict, name: str) -> dict:
    return next(s for s in p["stages"] if s["stage"] == name)


def test_every_yaml_in_manifests_is_a_run_manifest_or_an_accelerate_config():
    for path in YAMLS:
        if path not in RUN_MANIFESTS:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            assert "distributed_type" in config, f"{path.name}: a run manifest must open with '# dadpo-offline run ...'"
            ds_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
            if ds_file:  # launched from the repository root, as the file's first line says
                ds = json.loads((ROOT / ds_file).read_text(encoding="utf-8"))
                assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert {"demo.yaml", "vicuna7b_pruned.yaml", "qwen7b_to_qwen1.5b.yaml", "qwen7b_to_llama1b.yaml"} <= \
        {p.name for p in RUN_MANIFESTS}


@pytest.mark.parametrize("path", RUN_MANIFESTS, ids=lambda p: p.name)
def test_shipped_manifest_loads(path):
    m = load_manifest(path)
    assert m.name == path.stem


@pytest.mark.parametrize("path", RUN_MANIFESTS, ids=lambda p: p.name)
def test_plan_of_shipped_manifest_lists_stages_models_tokens_memory(path, no_models):
    m = load_manifest(path)
    p = plan(m)
    prune = ["prune"] if m.prune.source and not Path(m.student.model).exists() else []
    losses = list(dict.fromkeys([m.train.loss, *m.train.compare]))
    assert [s["stage"] for s in p["stages"]] == prune + PRECOMPUTE + [f"train-{x}" for x in losses] + ["eval", "report"]
    assert p["models"]["teacher"]["model"] == m.teacher.model and p["models"]["student"]["model"] == m.student.model
    for info in p["models"].values():
        assert info["params"] > 0 and info["params_from"]
    for s in p["stages"]:
        if "tokens" in s:
            assert isinstance(s["tokens"], int) and s["tokens"] > 0, s  # builtin or limited sources only
        if s.get("memory"):
            assert 0 < s["memory"]["total_gb"] < 200, s
    assert stage(p, "train-sft")["memory"]["states_gb"] == pytest.approx(16 * p["models"]["student"]["params"] / 1e9,
                                                                         rel=0.01)
    text = format_plan(p)
    for s in p["stages"]:
        assert s["stage"] in text
    assert m.teacher.model in text and " GB" in text


@pytest.mark.parametrize("name", ["qwen7b_to_qwen1.5b.yaml", "qwen7b_to_llama1b.yaml"])
def test_qwen_7b_bf16_weights_are_about_15_gb(name, no_models):
    p = plan(load_manifest(ROOT / "manifests" / name))
    assert p["models"]["teacher"]["params"] == pytest.approx(7.62e9, rel=0.01)
    assert stage(p, "generate-teacher")["memory"]["weights_gb"] == pytest.approx(15.2, rel=0.1)
    assert stage(p, "score-teacher")["memory"]["total_gb"] > stage(p, "generate-teacher")["memory"]["total_gb"]


def test_pruned_vicuna_student_keeps_80_percent_of_the_layer_parameters(no_models):
    p = plan(load_manifest(ROOT / "manifests" / "vicuna7b_pruned.yaml"))
    student, source = p["models"]["student"], p["models"]["student"]["source_info"]
    assert source["params"] == pytest.approx(6.74e9, rel=0.01)
    assert student["layer_params"] == pytest.approx(0.8 * source["layer_params"], rel=0.01)
    assert student["params"] == pytest.approx(source["params"] - 0.2 * source["layer_params"], rel=0.001)
    assert "approximate" in student["params_from"]
    assert p["stages"][0]["stage"] == "prune"
    assert not any("chat template" in w for w in p["warnings"])  # the manifest gives Vicuna one


@pytest.mark.parametrize("model,billions", [("lmsys/vicuna-7b-v1.5", 6.74), ("Qwen/Qwen2.5-7B-Instruct", 7.62),
                                            ("Qwen/Qwen2.5-1.5B-Instruct", 1.54),
                                            ("meta-llama/Llama-3.2-1B-Instruct", 1.24),
                                            ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.135)])
def test_param_counts_of_known_models_match_their_model_cards(model, billions):
    total, layers = param_counts(KNOWN[model])
    assert total / 1e9 == pytest.approx(billions, rel=0.01)
    assert 0 < layers < total


def test_unlimited_hub_source_has_unknown_tokens(tmp_path, no_models):
    p = plan(load_manifest(write(tmp_path, "prompts: {sources: [{hub: someone/chats}]}\n")))
    assert p["prompts"]["count"] is None
    assert stage(p, "generate-teacher")["tokens"] == UNKNOWN_PROMPTS
    assert stage(p, "train-dadpo")["tokens"] == UNKNOWN_PROMPTS
    assert "tokens: " + UNKNOWN_PROMPTS in format_plan(p)


def test_hub_source_under_a_total_limit_is_counted_at_the_limit(tmp_path, no_models):
    p = plan(load_manifest(write(tmp_path, "prompts: {sources: [{hub: someone/chats}, {builtin: train}], limit: 100, "
                                           "max_prompt_tokens: 300}\ngenerate: {teacher: {max_tokens: 50}}\n")))
    assert p["prompts"]["count"] == 100
    assert stage(p, "generate-teacher")["tokens"] == 100 * 50
    assert p["prompts"]["tokens"] == 300  # hub prompts are not read: their length is only bounded


def test_builtin_prompts_are_counted_from_the_packaged_file(tmp_path, no_models):
    from dadpo_offline.core.prompts import builtin_prompts

    p = plan(load_manifest(write(tmp_path, "prompts: {sources: [{builtin: heldout}], drop_benchmark_overlap: false}\n"
                                           "generate: {samples_per_prompt: 2, student: {max_tokens: 10}}\n")))
    assert p["prompts"]["count"] == len(builtin_prompts("heldout"))
    assert stage(p, "generate-student")["tokens"] == p["prompts"]["count"] * 2 * 10
    assert 0 < p["prompts"]["tokens"] < 1024


def test_per_role_samples_and_pairs_policy_set_the_token_counts(tmp_path, no_models):
    """2 teacher and 3 student samples per prompt, all 6 pairs: every sample is generated and scored,
    every pair trained on."""
    p = plan(load_manifest(write(tmp_path, "prompts: {sources: [{builtin: heldout}], drop_benchmark_overlap: false}\n"
                                           "generate: {teacher: {samples: 2, max_tokens: 10}, "
                                           "student: {samples: 3, max_tokens: 20}}\npairs: {policy: all}\n")))
    n, q = p["prompts"]["count"], p["prompts"]["tokens"]
    assert stage(p, "generate-teacher")["tokens"] == n * 2 * 10
    assert stage(p, "generate-student")["tokens"] == n * 3 * 20
    assert stage(p, "score-teacher")["tokens"] == stage(p, "score-reference")["tokens"] == n * (2 * (q + 10) + 3 * (q + 20))
    assert stage(p, "train-sft")["tokens"] == n * 2 * (q + 10)
    assert stage(p, "train-dadpo")["tokens"] == n * 6 * (2 * q + 30)
    assert "pairs.policy all (6 per prompt)" in stage(p, "pairs")["what"]


def test_model_counts_come_from_a_local_config_the_hf_cache_or_the_name(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(KNOWN["Qwen/Qwen2.5-1.5B-Instruct"]))
    local = describe_model(str(folder), None, "bfloat16", [])
    assert local["kind"] == "local folder" and local["params_from"] == "its config.json"
    assert local["params"] == pytest.approx(1.54e9, rel=0.01)

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(KNOWN["HuggingFaceTB/SmolLM2-135M-Instruct"]))
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = describe_model("someone/tiny", None, "bfloat16", [])
    assert cached["params_from"] == "config.json in the offline HF cache"
    assert cached["params"] == pytest.approx(0.135e9, rel=0.01)

    named = describe_model("someone/Foo-3.5B-Chat", None, "bfloat16", [])
    assert named["params"] == 3.5e9 and "parsed from the name" in named["params_from"]
    unknown = describe_model("someone/foo-chat", None, "bfloat16", [])
    assert unknown["params"] is None and unknown["params_from"].startswith("unknown")


def test_plan_reports_every_problem_at_once(tmp_path, no_models):
    """What the manifest alone shows fails its load (before any plan or run); the plan adds what the disk shows."""
    bad = "train: {batch_size: 6, micro_batch_size: 4}\nsft: {batch_size: 6, micro_batch_size: 4}\n"
    with pytest.raises(ManifestError) as error:
        load_manifest(write(tmp_path, bad))
    message = str(error.value)
    for expected in ("train.batch_size=6", "sft.batch_size=6"):
        assert expected in message
    path = write(tmp_path, "teacher: {model: ./no-such-folder}\nstudent: {model: someone/student}\n"
                           "prune: {source: embedded:smollm2-135m-instruct}\n"
                           "prompts: {sources: [{jsonl: missing.jsonl}]}\n")
    with pytest.raises(ManifestError) as error:
        plan(load_manifest(path))
    message = str(error.value)
    for expected in ("no-such-folder", "student.model 'someone/student'", "missing.jsonl"):
        assert expected in message


def test_training_memory_grows_without_gradient_checkpointing(tmp_path, no_models):
    base = "student: {model: Qwen/Qwen2.5-1.5B-Instruct}\nteacher: {model: Qwen/Qwen2.5-7B-Instruct}\n"
    on = plan(load_manifest(write(tmp_path, base + "train: {gradient_checkpointing: true}\n")))
    off = plan(load_manifest(write(tmp_path, base + "train: {gradient_checkpointing: false}\n")))
    assert stage(off, "train-dadpo")["memory"]["activations_gb"] > stage(on, "train-dadpo")["memory"]["activations_gb"]
    assert "gradient_checkpointing on" in stage(on, "train-dadpo")["memory"]["basis"]


def test_gpu_smoke_script_is_valid_bash():
    script = ROOT / "bench" / "gpu_smoke.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text(encoding="utf-8")


def test_a_missing_chat_template_file_is_a_plan_problem(no_models, tmp_path):
    vicuna = ROOT / "manifests" / "vicuna7b_pruned.yaml"
    with pytest.raises(ManifestError, match="teacher.chat_template: .*nowhere.jinja not found"):
        plan(load_manifest(vicuna, [f"teacher.chat_template={tmp_path / 'nowhere.jinja'}"]))


def test_lora_training_memory_holds_the_frozen_base_and_a_small_adapter(tmp_path, no_models):
    """Qwen2.5-1.5B, LoRA rank 16 on every projection: 28 layers × 16 × (in + out) summed over q, k, v, o
    (3,072 + 1,792 + 1,792 + 3,072) and gate, up, down (3 × 10,496) = 18,464,768 adapter parameters."""
    from dadpo_offline.plan import lora_params

    assert lora_params(KNOWN["Qwen/Qwen2.5-1.5B-Instruct"], 16, "all-linear") == 18_464_768
    assert lora_params(KNOWN["Qwen/Qwen2.5-1.5B-Instruct"], 16, ["q_proj", "v_proj"]) == 28 * 16 * (3072 + 1792)
    base = "student: {model: Qwen/Qwen2.5-1.5B-Instruct}\nteacher: {model: Qwen/Qwen2.5-7B-Instruct}\n"
    full = plan(load_manifest(write(tmp_path, base)))
    lora = plan(load_manifest(write(tmp_path, base + "sft: {peft: {rank: 16}}\ntrain: {peft: {rank: 16}}\n")))
    for name in ("train-sft", "train-dadpo"):
        full_states, lora_states = (stage(p, name)["memory"]["states_gb"] for p in (full, lora))
        params = full["models"]["student"]["params"]
        assert full_states == pytest.approx(params * 16 / 1e9, abs=0.01)
        assert lora_states == pytest.approx((params * 4 + 18_464_768 * 16) / 1e9, abs=0.01)
        assert "LoRA rank 16 adapter 18.5M params" in stage(lora, name)["memory"]["basis"]
        assert "LoRA rank 16, adapter + merged/" in stage(lora, name)["what"]
