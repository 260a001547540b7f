"""Width pruning of the real SmolLM2-135M-Instruct at ratio 0.2, head_ratio 1/3, offline.

SmolLM2-135M: 30 layers, hidden 576, 9 query heads in 3 KV-head groups, head_dim 64, MLP 1536.
The rule: MLP keeps round(1536 x 0.8 / 8) x 8 = 154 x 8 = 1232 channels (304 go); each group loses
1/3 x 3 = 1 query head (9 -> 6), key/value heads stay at 3. Per layer that removes
3 x 576 x 304 = 525,312 MLP weights (gate and up rows, down columns) plus 2 x 576 x 64 x 3 =
221,184 attention weights (query rows, output columns): 746,496 per layer, 22,394,880 in all.
"""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import vllm_greedy_answer
from dadpo_offline.cli import main
from dadpo_offline.core.steps import pipeline_steps
from dadpo_offline.errors import InputError, ManifestError
from dadpo_offline.manifest import load_manifest
from dadpo_offline.prune import prune_model
from dadpo_offline.prune.width import width_shape

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
REMOVED_PER_LAYER = 3 * 576 * 304 + 2 * 576 * 64 * 3


@pytest.fixture(scope="module")
def width_pruned(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("width") / "student"
    return out, prune_model(smollm2_dir, 0.2, out, calibration_prompts=2, method="width", head_ratio=1 / 3)


def chat_ids(folder):
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])


def test_width_prune_has_the_parameter_count_the_rule_implies(width_pruned, smollm2_dir):
    out, report = width_pruned
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["head_dim"], config["hidden_size"], config["num_hidden_layers"]) == (6, 3, 1232, 64, 576, 30)
    original = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(smollm2_dir).parameters())
    assert report["params_before"] == original
    assert report["params_after"] == original - 30 * REMOVED_PER_LAYER
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) == report["params_after"]
    assert (report["method"], report["ratio"], report["head_ratio"], report["heads_after"],
            report["intermediate_after"]) == ("width", 0.2, 1 / 3, 6, 1232)
    for layer in report["removed"].values():  # one query head from each KV-head group (heads 0-2, 3-5, 6-8)
        assert [h // 3 for h in layer["heads"]] == [0, 1, 2]
        assert len(set(layer["channels"])) == 304 and layer["channels"] == sorted(layer["channels"])
    assert json.loads((out / "prune.json").read_text()) == report
    assert [p.name for p in out.parent.iterdir()] == ["student"]


def test_width_pruned_model_equals_the_original_with_those_parts_silenced(width_pruned, smollm2_dir):
    """A removed head contributes nothing once its output-projection columns are zero, a removed MLP
    channel once its down-projection column is zero: that original must give the pruned logits (to
    fp32 summation-order noise, measured 3.5e-4 over 30 layers; a wrong head or channel moves them by far more)."""
    out, report = width_pruned
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            for head in report["removed"][str(i)]["heads"]:
                layer.self_attn.o_proj.weight[:, head * 64:(head + 1) * 64] = 0
            layer.mlp.down_proj.weight[:, report["removed"][str(i)]["channels"]] = 0
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = chat_ids(out)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(ids).logits, original(ids).logits, rtol=0, atol=1e-3)
    new = student.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert len(new) > 0


def test_vllm_serves_the_width_pruned_folder(width_pruned):
    out, _ = width_pruned
    assert len(vllm_greedy_answer(out, CHAT)) > 0


def test_width_is_another_prune_than_depth(width_pruned, smollm2_dir):
    """A width-pruned folder is done for the same width prune only: a depth prune, or other ratios, are refused."""
    out, report = width_pruned
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert prune_model(smollm2_dir, 0.2, out, calibration_prompts=2, method="width", head_ratio=1 / 3) == report
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(InputError, match=r"not .* pruned at ratio 0.2 \(depth\)"):
        prune_model(smollm2_dir, 0.2, out)
    with pytest.raises(InputError, match=r"head_ratio 0.0 \(width\)"):
        prune_model(smollm2_dir, 0.2, out, method="width")


def test_cli_refuses_a_head_ratio_that_breaks_head_groups(smollm2_dir, tmp_path):
    result = CliRunner().invoke(main, ["prune", smollm2_dir, "--method", "width", "--head-ratio", "0.2",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1  # refused from the config, before any weights load
    assert result.output == (f"Error: head_ratio 0.2 would remove 0.6 of the 3 query heads in each of 3 KV-head groups "
                             f"of {smollm2_dir}; use a multiple of 1/3 (0.3333) below 1, or 0\n")
    assert not (tmp_path / "out").exists()
    depth = CliRunner().invoke(main, ["prune", smollm2_dir, "--head-ratio", "0.5", "--out", str(tmp_path / "out")])
    assert depth.exit_code == 2 and "--head-ratio applies to --method width only" in depth.output


def test_width_shape_follows_the_rule():
    assert width_shape(9, 3, 1536, 0.2, 0.0, "m") == {"heads": 9, "kv_heads": 3, "intermediate": 1232}
    assert width_shape(9, 3, 1536, 0.2, 0.333, "m") == {"heads": 6, "kv_heads": 3, "intermediate": 1232}
    assert width_shape(9, 3, 1536, 0.5, 2 / 3, "m") == {"heads": 3, "kv_heads": 3, "intermediate": 768}
    # Vicuna-7B: multi-head attention, heads go with their key/value heads; 11008 x 0.8 = 8806.4 -> 8808
    assert width_shape(32, 32, 11008, 0.2, 0.1875, "v") == {"heads": 26, "kv_heads": 26, "intermediate": 8808}
    with pytest.raises(InputError, match=r"remove 6.4 of the 32 heads \(multi-head attention"):
        width_shape(32, 32, 11008, 0.2, 0.2, "v")
    with pytest.raises(InputError, match="every query head"):
        width_shape(8, 4, 64, 0.2, 0.999, "m")  # 1.998 of 2 heads: within 0.01 of whole


def test_manifest_prune_method_is_checked_and_reaches_the_prune_command(tmp_path):
    with pytest.raises(ManifestError) as error:
        load_manifest(None, ["prune.method=breadth", "prune.head_ratio=1.5"])
    assert "prune.method: must be depth or width, got 'breadth'" in str(error.value)
    assert "prune.head_ratio: must be in [0, 1), got 1.5" in str(error.value)
    with pytest.raises(ManifestError, match="prune.head_ratio: applies to prune.method width only"):
        load_manifest(None, ["prune.head_ratio=0.5"])
    m = load_manifest(None, ["prune.source=embedded:smollm2-135m-instruct", f"student.model={tmp_path / 's'}",
                             "prune.method=width", "prune.head_ratio=0.333"])
    [command] = [s.command for s in pipeline_steps(m) if s.name == "prune"]
    assert command == (f"dadpo-offline prune embedded:smollm2-135m-instruct --method width --ratio 0.2 "
                       f"--head-ratio 0.333 --out {tmp_path / 's'} --calibration-prompts 32")
