"""LoRA students (`sft.peft`, `train.peft`) on the embedded demo: real SmolLM2, real peft, real vLLM (CPU).

One shared run (module fixture): LoRA dSFT of SmolLM2 on a copy of the session's vLLM cache →
rescore with the dSFT student as reference (vLLM, from its merged model) → LoRA daDPO from it.
"""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dadpo_offline.cache.index import open_cache
from dadpo_offline.core.models import resolve_model
from dadpo_offline.errors import TrainError
from dadpo_offline.manifest import load_manifest
from dadpo_offline.pipeline import with_reference
from dadpo_offline.plan import KNOWN, lora_params
from dadpo_offline.train.dpo import train_dadpo
from dadpo_offline.train.sft import train_sft

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA = ["peft.rank=8", "peft.alpha=16", "peft.dropout=0", "batch_size=2", "micro_batch_size=2", "max_steps=2",
        "report_to=[]", "warmup_ratio=0", "lr_scheduler=constant", "save_steps=1"]


def lora_manifest(small_cache, tmp_path, *more):
    sets = [f"sft.{s}" for s in LORA + ["learning_rate=0.003"]] + [f"train.{s}" for s in LORA + ["learning_rate=0.003"]]
    return load_manifest(small_cache.parent / "manifest.yaml", [f"cache_dir={tmp_path / 'cache'}",
                                                                 f"train.output_dir={tmp_path / 'train'}",
                                                                 "train.step0_pairs=4", *sets, *more])


@pytest.fixture(scope="module")
def lora_run(small_cache, tmp_path_factory):
    from dadpo_offline.precompute.run import precompute

    base = tmp_path_factory.mktemp("lora_run")
    shutil.copytree(small_cache, base / "cache")
    m = lora_manifest(small_cache, base)
    sft = train_sft(m, quiet=True)
    scored = with_reference(m)
    precompute(scored, stage="score")  # vLLM scores the dSFT reference: its merged model
    dadpo = train_dadpo(scored, quiet=True)
    return {"manifest": scored, "sft": sft, "dadpo": dadpo, "base": base}


def logps(model, sequences):
    """Per-token log-probs of each whole sequence after its first token (fp32, one row at a time)."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            out.append(torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0])
    return out


def cached_sequences(cache_dir, n=4):
    with open_cache(cache_dir).connect() as con:
        rows = con.execute("SELECT chosen_input_ids, rejected_input_ids FROM pairs ORDER BY prompt_id, chosen_sample, rejected_sample "
                           "LIMIT ?", [n // 2]).fetchall()
    return [list(ids) for row in rows for ids in row]


def test_lora_stages_write_an_adapter_and_a_merged_model(lora_run):
    for stage in ("sft", "dadpo"):
        folder = lora_run["base"] / "train" / stage
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()
        assert (folder / "merged" / "model.safetensors").is_file() and (folder / "merged" / "tokenizer.json").is_file()
        resolved = resolve_model(str(folder))
        assert resolved.path == str(folder / "merged") and resolved.portable_name == stage
        assert json.loads((folder / "run.json").read_text())["peft"]["rank"] == 8
        adapter = load_file(folder / "adapter_model.safetensors")  # what `run --dry-run` counts, by hand
        assert sum(t.numel() for t in adapter.values()) == lora_params(KNOWN[SMOLLM2_HUB], 8, "all-linear") == 2_442_240
    config = json.loads((lora_run["base"] / "train" / "dadpo" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_run["base"] / "train" / "sft" / "merged")  # stacked on dSFT


def test_report_shows_each_stage_s_adapter_settings(lora_run):
    from dadpo_offline.core.layout import RunLayout
    from dadpo_offline.report import write_report

    write_report(RunLayout.of(lora_run["manifest"]))
    rows = [line for line in (lora_run["base"] / "report" / "report.md").read_text().splitlines()
            if line.startswith("| peft |")]
    assert len(rows) == 1 and rows[0].count('"rank": 8') == 2, rows  # sft and dadpo


def test_lora_dadpo_starts_at_the_reference(lora_run):
    """Step 0: a fresh adapter (B = 0) on the merged dSFT student reproduces vLLM's cached reference numbers."""
    step0 = lora_run["dadpo"]["step0"]
    assert step0["sequences"] == 8 and step0["token_mean"] < 1e-3  # vLLM fp32 vs transformers fp32
    assert lora_run["dadpo"]["steps"] == 2 and lora_run["sft"]["steps"] == 2


def test_merged_models_equal_their_adapter_models_and_the_adapter_changes_the_answers(lora_run, smollm2_dir):
    """base + adapter (peft) = merged/ (transformers) = merged/ (vLLM), within fp32 noise, for both stages;
    the adapters moved the numbers, and daDPO's greedy answers differ from the dSFT student's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dadpo_offline.core.engines import VllmEngine
    from dadpo_offline.manifest import EngineConfig

    train = lora_run["base"] / "train"
    sequences = cached_sequences(lora_run["manifest"].cache_dir, 4)
    starts = {"sft": smollm2_dir, "dadpo": train / "sft" / "merged"}
    answers = {}
    for stage, start in starts.items():
        base = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
        before = logps(base, sequences)
        adapted = PeftModel.from_pretrained(base, str(train / stage)).eval()
        merged = AutoModelForCausalLM.from_pretrained(train / stage / "merged", dtype=torch.float32).eval()
        with_adapter, from_merged = logps(adapted, sequences), logps(merged, sequences)
        for a, b in zip(with_adapter, from_merged):
            assert (a - b).abs().max().item() < 1e-4
        assert max((a - b).abs().max().item() for a, b in zip(with_adapter, before)) > 1e-2  # the adapter is not zero
        with torch.no_grad():
            answers[stage] = [merged.generate(torch.tensor([ids[:12]]), max_new_tokens=12, do_sample=False)[0].tolist()
                              for ids in sequences[::2]]
    assert answers["sft"] != answers["dadpo"]
    engine = VllmEngine(resolve_model(str(train / "dadpo")), "float32", EngineConfig(), 2)
    try:
        scored = engine.score(sequences, [1] * len(sequences))
    finally:
        engine.close()
    for a, v in zip(with_adapter, scored):  # the daDPO adapter model's numbers, from vLLM on merged/
        assert (a - torch.tensor(v)).abs().max().item() < 1e-3
    with open_cache(lora_run["manifest"].cache_dir).connect() as con:
        (settings,) = con.execute("SELECT settings FROM stages WHERE stage = 'score-reference' AND active").fetchone()
    assert json.loads(settings)["model"] == "sft"  # the cache's reference numbers came from vLLM on sft/merged


def test_changing_the_rank_is_another_run(lora_run, small_cache):
    """The adapter's settings are part of the stage's identity: a rerun with another rank is neither
    'finished before' nor a resume of the rank-8 checkpoints."""
    m = lora_run["manifest"]
    again = train_sft(m, quiet=True)
    assert again.get("skipped") == "finished before with the same settings"
    other = dataclasses.replace(m, sft=dataclasses.replace(m.sft, peft=dataclasses.replace(m.sft.peft, rank=4)))
    with pytest.raises(TrainError, match="holds checkpoints of a run with other peft"):
        train_sft(other, quiet=True)


def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapter(tiny_cache, tmp_path):
    """kill -9 at step 3 of 6 (checkpoint-2 holds the adapter, its optimiser and RNG), rerun: the final
    adapter equals an uninterrupted run's; only adapter weights are ever saved. Tiny models, fast."""
    import subprocess
    import sys

    from test_train import KILLER, RESUME_SETTINGS

    lora = ["train.peft.rank=4", "train.peft.dropout=0"]
    straight = train_dadpo(load_manifest(tiny_cache, RESUME_SETTINGS + lora + [f"train.output_dir={tmp_path / 'a'}"]),
                           quiet=True)
    killed = RESUME_SETTINGS + lora + [f"train.output_dir={tmp_path / 'b'}"]
    proc = subprocess.run([sys.executable, "-c", KILLER, "dadpo", "step-3", str(tiny_cache), *killed],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "b" / "dadpo" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "b" / "dadpo").glob("checkpoint-2/model*.safetensors"))
    resumed = train_dadpo(load_manifest(tiny_cache, killed), quiet=True)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 6
    a = load_file(tmp_path / "b" / "dadpo" / "adapter_model.safetensors")
    b = load_file(straight["output_dir"] + "/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
