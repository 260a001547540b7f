"""lm-eval suite through the real lm_eval code path, offline, on the project's own tiny data sets.

SmolLM2 scores the multiple-choice tasks (log-likelihoods are quick on CPU). The generative gsm8k
runs on a model that answers at once with end-of-sequence: SmolLM2, or any random model, keeps
writing up to lm-eval's 256-token cap, which takes minutes on a busy 2-core CPU.
"""
import json
import time
from pathlib import Path

import pytest

from dadpo_offline.errors import InputError
from dadpo_offline.eval.lmeval import builtin_task_manager, run_lmeval
from dadpo_offline.manifest import LmEvalConfig
from dadpo_offline.core.models import resolve_model

DATA = Path(__file__).parent / "data" / "lmeval"


def local_files(task: str, *splits: str) -> dict[str, str]:
    return {split: str(DATA / f"{task}_{split}.jsonl") for split in splits}


@pytest.fixture
def smollm2(smollm2_dir):
    return resolve_model(smollm2_dir)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, tiny_student):
    """The tiny student rewired so that end-of-sequence has the top logit after every token.

    The layers add nothing to the residual stream (zero output projections), so the final hidden
    state is the normalised input embedding; with every embedding row equal to v and eos's row 2v,
    the tied output head scores eos 2 v.h against v.h > 0 for every other token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.get_input_embeddings().weight
        embeddings.fill_(1.0)
        embeddings[model.config.eos_token_id] = 2.0
    directory = tmp_path_factory.mktemp("eos_model")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_student).save_pretrained(directory)
    return resolve_model(str(directory))


def test_run_lmeval_scores_local_data_and_reuses_the_cache(tmp_path, smollm2, monkeypatch):
    import lm_eval

    config = LmEvalConfig(tasks={"arc_challenge": 2, "winogrande": 0}, limit=3, batch_size=4,
                          data_files={"arc_challenge": local_files("arc_challenge", "train", "validation", "test"),
                                      "winogrande": local_files("winogrande", "validation")})
    rows = run_lmeval(config, {"smol": smollm2}, tmp_path / "out", tmp_path / "cache")

    assert [(r["model"], r["suite"], r["metric"], r["n"]) for r in rows] == [
        ("smol", "lmeval", "arc_challenge/acc", 3), ("smol", "lmeval", "arc_challenge/acc_norm", 3),
        ("smol", "lmeval", "winogrande/acc", 2)]  # limit 3, but the winogrande file has only 2 rows
    assert all(0 <= r["value"] <= 1 and isinstance(r["stderr"], float) for r in rows)
    arc_yaml = (tmp_path / "out" / "tasks" / "arc_challenge_local.yaml").read_text()
    assert f"include: {builtin_task_manager().task_index['arc_challenge'].yaml_path}\n" in arc_yaml
    assert "dataset_path: json\n" in arc_yaml
    winogrande_yaml = (tmp_path / "out" / "tasks" / "winogrande_local.yaml").read_text()
    assert "training_split: null\n" in winogrande_yaml  # no local train split: lm-eval must not look for one
    raw = json.loads((tmp_path / "out" / "lmeval" / "smol.json").read_text())
    assert [results["n-shot"] for results in raw.values()] == [{"arc_challenge_local": 2}, {"winogrande_local": 0}]
    assert len(list((tmp_path / "cache" / "lmeval").glob("*.json"))) == 2

    def second_call_must_not_run_lm_eval(*args, **kwargs):
        raise AssertionError("lm-eval ran although its results were cached")

    monkeypatch.setattr(lm_eval, "simple_evaluate", second_call_must_not_run_lm_eval)
    assert run_lmeval(config, {"smol": smollm2}, tmp_path / "out", tmp_path / "cache") == rows


def test_run_lmeval_reports_generative_task_per_filter(tmp_path, eos_model):
    config = LmEvalConfig(tasks={"gsm8k": 1}, limit=2, batch_size=2,
                          data_files={"gsm8k": local_files("gsm8k", "train", "test")})
    rows = run_lmeval(config, {"eos": eos_model}, tmp_path / "out", tmp_path / "cache")

    assert [(r["metric"], r["value"], r["n"]) for r in rows] == [("gsm8k/exact_match,strict-match", 0.0, 2),
                                                                 ("gsm8k/exact_match,flexible-extract", 0.0, 2)]
    raw = json.loads((tmp_path / "out" / "lmeval" / "eos.json").read_text())
    assert raw["gsm8k (1-shot, local data)"]["n-shot"] == {"gsm8k_local": 1}


def test_run_lmeval_rejects_unknown_task(tmp_path, smollm2):
    with pytest.raises(InputError, match=r"does not know no_such_task; list its task names with: lm-eval ls tasks"):
        run_lmeval(LmEvalConfig(tasks={"arc_challenge": 0, "no_such_task": 0}), {"smol": smollm2}, tmp_path, tmp_path)


def test_run_lmeval_rejects_missing_data_file(tmp_path, smollm2):
    missing = tmp_path / "nowhere.jsonl"
    config = LmEvalConfig(tasks={"arc_challenge": 0}, data_files={"arc_challenge": {"test": str(missing)}})
    with pytest.raises(InputError, match=rf"data_files.arc_challenge.test: data file {missing} does not exist"):
        run_lmeval(config, {"smol": smollm2}, tmp_path, tmp_path)


def test_run_lmeval_rejects_data_files_for_a_group(tmp_path, smollm2):
    config = LmEvalConfig(tasks={"mmlu": 5}, data_files={"mmlu": local_files("arc_challenge", "test")})
    with pytest.raises(InputError, match=r"data_files.mmlu: mmlu is an lm-eval group, not one YAML task"):
        run_lmeval(config, {"smol": smollm2}, tmp_path, tmp_path)


def test_run_lmeval_rejects_split_the_task_does_not_read(tmp_path, smollm2):
    config = LmEvalConfig(tasks={"gsm8k": 0}, data_files={"gsm8k": {"dev": str(DATA / "gsm8k_test.jsonl")}})
    with pytest.raises(InputError, match=r"data_files.gsm8k: split\(s\) dev are not read by lm-eval task gsm8k; "
                                         r"it reads test, train"):
        run_lmeval(config, {"smol": smollm2}, tmp_path, tmp_path)


def test_run_lmeval_hub_task_offline_fails_fast(tmp_path, tiny_student):
    builtin_task_manager()  # built once per process; not what this test times
    start = time.monotonic()
    with pytest.raises(InputError, match=r"could not load the data set of hellaswag offline .*Rowan/hellaswag.*"
                                         r"give local files as eval.lmeval.data_files.<task>"):
        run_lmeval(LmEvalConfig(tasks={"hellaswag": 0}, limit=1), {"tiny": resolve_model(str(tiny_student))},
                   tmp_path, tmp_path)
    assert time.monotonic() - start < 30  # a hub lookup that retries would take 40 s or more


def test_run_lmeval_rejects_tag(tmp_path, smollm2):
    with pytest.raises(InputError, match=r"ai2_arc is an lm-eval tag, .*; list its tasks instead: "
                                         r"arc_challenge, arc_easy"):
        run_lmeval(LmEvalConfig(tasks={"ai2_arc": 25}), {"smol": smollm2}, tmp_path, tmp_path)
