"""Layer pruning of the real SmolLM2-135M-Instruct (30 layers → 24 at ratio 0.2), offline."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import as_another_user, vllm_greedy_answer
from dadpo_offline.cli import main
from dadpo_offline.errors import InputError, ModelError
from dadpo_offline.prune import decoder_layers, drop_layers, prune_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("prune") / "student"
    return out, prune_model(smollm2_dir, 0.2, out, calibration_prompts=4)


def chat_ids(folder):
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])


def test_prune_removes_the_six_lowest_scoring_layers(pruned):
    out, report = pruned
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 24
    assert (report["layers_before"], report["layers_after"], report["calibration_prompts"]) == (30, 24, 4)
    assert len(set(report["removed"])) == 6 and report["removed"] == sorted(report["removed"])
    ranked = sorted(range(30), key=lambda i: (report["scores"][str(i)], i))
    assert sorted(ranked[:6]) == report["removed"]
    assert report["calibration_tokens"] > 4 * 10
    assert json.loads((out / "prune.json").read_text()) == report
    assert [p.name for p in out.parent.iterdir()] == ["student"]  # no staging folder left behind


def test_pruned_folder_loads_cleanly_and_chats(pruned):
    out, _ = pruned
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = chat_ids(out)
    new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert len(new) > 0 and AutoTokenizer.from_pretrained(out).decode(new, skip_special_tokens=True).strip()


def test_pruned_model_equals_original_with_layers_skipped(pruned, smollm2_dir):
    out, report = pruned
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    original.model.layers = torch.nn.ModuleList(
        layer for i, layer in enumerate(original.model.layers) if i not in report["removed"])
    original.config.num_hidden_layers = 24
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = chat_ids(out)
    with torch.no_grad():
        want = original(ids, use_cache=False, output_hidden_states=True)
        got = student(ids, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_drop_layers_keeps_the_kv_cache_usable(pruned, smollm2_dir):
    """Renumbered layer_idx: cached greedy decoding in memory matches the saved folder's."""
    out, report = pruned
    in_memory = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    drop_layers(in_memory, report["removed"])
    assert [layer.self_attn.layer_idx for layer in in_memory.model.layers] == list(range(24))
    ids = chat_ids(out)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(in_memory.generate(ids, max_new_tokens=8, do_sample=False),
                       saved.generate(ids, max_new_tokens=8, do_sample=False))


def test_prune_choice_is_deterministic(pruned, smollm2_dir, tmp_path):
    _, report = pruned
    again = prune_model(smollm2_dir, 0.2, tmp_path / "again", calibration_prompts=4)
    assert again["removed"] == report["removed"] and again["scores"] == report["scores"]


def test_prune_rerun_into_same_folder_is_a_noop(pruned, smollm2_dir):
    out, report = pruned
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert prune_model(smollm2_dir, 0.2, out, calibration_prompts=4) == report
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_cli_prune_prints_the_report(pruned, smollm2_dir):
    out, report = pruned
    result = CliRunner().invoke(main, ["prune", smollm2_dir, "--ratio", "0.2", "--out", str(out),
                                       "--calibration-prompts", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == report


def test_prune_refuses_a_foreign_folder(pruned, smollm2_dir, tmp_path):
    out, _ = pruned
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=str(tmp_path)):
        prune_model(smollm2_dir, 0.2, tmp_path)
    with pytest.raises(InputError, match="not .* pruned at ratio 0.3"):
        prune_model(smollm2_dir, 0.3, out)
    result = CliRunner().invoke(main, ["prune", smollm2_dir, "--out", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5])
def test_prune_rejects_a_bad_ratio(smollm2_dir, tmp_path, ratio):
    with pytest.raises(InputError, match="ratio"):
        prune_model(smollm2_dir, ratio, tmp_path / "out")
    assert CliRunner().invoke(main, ["prune", smollm2_dir, "--ratio", str(ratio), "--out", str(tmp_path)]).exit_code == 2


def test_prune_refuses_removing_every_layer(smollm2_dir, tmp_path):
    with pytest.raises(InputError, match="all 30 decoder layers"):
        prune_model(smollm2_dir, 0.99, tmp_path / "out", calibration_prompts=1)
    assert not (tmp_path / "out").exists()


def test_decoder_layers_refuses_a_model_without_a_layer_list(tiny_student):
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert decoder_layers(model)[1:] == ("layers", model.model.layers)
    model.model.layers = torch.nn.Sequential(*model.model.layers)
    with pytest.raises(ModelError, match="decoder layer list"):
        drop_layers(model, [0])


def test_vllm_serves_the_pruned_folder(pruned):
    out, _ = pruned
    assert len(vllm_greedy_answer(out, CHAT)) > 0


def test_pruned_folder_has_the_users_file_mode(pruned):
    """Not transformers' private 600 for the weights: a team shares run folders."""
    from dadpo_offline.files import current_umask

    out, _ = pruned
    mask = current_umask()
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {oct(0o666 & ~mask)}
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize("locked", ["model.safetensors", "."])
def test_unreadable_model_is_one_line_for_another_user(pruned, shared_dir, locked):
    """A weights file readable by its owner only, or a model folder only its owner may enter:
    one Error line naming it, exit 1, nothing written."""
    import os
    import shutil

    out, _ = pruned
    model = shared_dir / "model"
    shutil.copytree(out, model)
    os.chmod(model / locked, 0o700 if locked == "." else 0o600)
    code, output = as_another_user("prune", model, "--out", shared_dir / "student")
    target = model / "config.json" if locked == "." else model / locked
    assert code == "1", output
    assert output.strip() == (f"Error: cannot read {target}: Permission denied — the model's files must be "
                              "readable by this user")
    assert not (shared_dir / "student").exists()
