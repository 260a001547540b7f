"""Phase two on real (tiny) models and a real cache: log-probs, daDPO steps, step-0 check, resume, dSFT data.

The cache (`tiny_cache`) was built by phase one with the transformers engine in fp32: tiny
random student sharing SmolLM2's tokenizer, tiny teacher with its own tokenizer; 12 pairs.
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_tiny_student
from dadpo_offline.cache.index import open_cache
from dadpo_offline.errors import CacheError, TrainError
from dadpo_offline.manifest import load_manifest
from dadpo_offline.train.data import SftCollator, check_lengths, load_pairs
from dadpo_offline.train.dpo import train_dadpo
from dadpo_offline.train.logps import sequence_logps, token_logps

FAST = ["train.report_to=[]", "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.learning_rate=0.001"]


def tiny_llama(vocab=50, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).eval()


def test_token_logps_equal_a_full_log_softmax_on_response_tokens_only():
    """Right-padded rows with different prompt lengths: our sums = gather of a full fp32 log_softmax."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (9, 14, 6)]
    prompt_lens = torch.tensor([3, 8, 2])
    seq_lens = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros((3, 14), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        ours = sequence_logps(model, {"input_ids": ids, "attention_mask": mask, "prompt_lens": prompt_lens,
                                      "seq_lens": seq_lens})
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    for i, s in enumerate(seqs):
        p = int(prompt_lens[i])
        expected = sum(full[i, t - 1, s[t]].item() for t in range(p, len(s)))
        assert ours[i].item() == pytest.approx(expected, abs=1e-4)
    _, kept, first = token_logps(model, ids, mask, prompt_lens, seq_lens)
    assert first == 2 and kept.shape == (3, 12)  # positions 0-1 never reach the output layer
    assert kept.sum(-1).tolist() == [6, 6, 4]


def test_check_lengths_refuses_a_response_count_that_differs_from_the_cache():
    check_lengths([1, 2, 3, 4], 2, 2, "p")
    with pytest.raises(CacheError, match="cache counted 3"):
        check_lengths([1, 2, 3, 4], 2, 3, "p")


def test_sft_collator_puts_loss_on_response_tokens_only():
    batch = SftCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8], "prompt_len": 3}, {"input_ids": [5, 9], "prompt_len": 1}])
    assert batch["labels"].tolist() == [[-100, -100, -100, 8], [-100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_pairs_come_from_the_cache_with_consistent_lengths(tiny_cache):
    pairs = load_pairs(load_manifest(tiny_cache).cache_dir)
    assert len(pairs) == 12  # 6 prompts x 2 samples
    for p in pairs:
        assert len(p["chosen_input_ids"]) - p["chosen_prompt_len"] == p["chosen_tokens"]


def test_dadpo_steps_lower_the_loss_and_raise_the_margins(tiny_cache, tmp_path):
    """Full batch (12 pairs), 3 steps at lr 1e-3. Step 1 runs with policy = reference, so its loss is
    known from the cache alone: mean over pairs of log(1 + exp(−β2·[(ref_w − te_w) − (ref_l − te_l)]))."""
    m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path}", "train.batch_size=12",
                                          "train.micro_batch_size=12", "train.max_steps=3"])
    result = train_dadpo(m, quiet=True)
    history = result["history"]
    assert [h["loss"] for h in history] == sorted((h["loss"] for h in history), reverse=True)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    first = history[0]
    assert first["loss"] == pytest.approx(first_step_loss_from_the_cache(m), rel=1e-5)
    assert first["loss"] > math.log(2)  # the teacher term is negative at step 0
    assert abs(first["ref_margin"]) < 1e-3
    assert first["rewards/margins"] == pytest.approx(first["ref_term"] + first["teacher_term"], abs=1e-6)
    assert first["teacher_term"] == pytest.approx(m.train.beta2 * first["teacher_margin"], rel=1e-6)
    for key in ("grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "tokens_per_second"):
        assert key in first
    assert result["step0"]["token_mean"] < 1e-4  # same engine numerics as the cached reference
    assert result["step0"]["anchor_max"] == 0.0
    out = tmp_path / "dadpo"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "beta2" in (out / "README.md").read_text()


def first_step_loss_from_the_cache(m) -> float:
    """Step 1 runs with policy = reference: its loss is known from the cache alone (float64, in DuckDB)."""
    with open_cache(m.cache_dir).connect() as con:
        return con.execute("SELECT avg(ln(1 + exp(-? * ((ref_chosen_logp - teacher_chosen_logp) "
                           "- (ref_rejected_logp - teacher_rejected_logp))))) FROM pairs", [m.train.beta2]).fetchone()[0]


def test_cached_numbers_reach_the_loss_exactly_through_a_deepspeed_input_cast(tiny_cache, tmp_path, monkeypatch):
    """Under DeepSpeed the Trainer casts every floating batch input to the engine's dtype (bf16 rounds
    −152.68 to −153.0). DeepSpeed needs a GPU, so a FAKE stands in for that one branch of
    `Trainer._prepare_input`; the cached numbers must never be such an input."""
    from transformers import Trainer

    prepare = Trainer._prepare_input

    def deepspeed_cast(self, data):  # FAKE: DeepSpeed's cast of floating inputs, as in Trainer._prepare_input
        if isinstance(data, torch.Tensor) and torch.is_floating_point(data):
            return data.to(self.args.device, dtype=torch.bfloat16)
        return prepare(self, data)

    monkeypatch.setattr(Trainer, "_prepare_input", deepspeed_cast)
    m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path}", "train.batch_size=12",
                                          "train.micro_batch_size=12", "train.max_steps=1", "train.step0_pairs=12"])
    result = train_dadpo(m, quiet=True)
    assert result["history"][0]["loss"] == pytest.approx(first_step_loss_from_the_cache(m), rel=1e-6)
    assert result["step0"]["anchor_max"] == 0.0 and result["step0"]["sequences"] == 24


def test_step0_check_compares_the_numbers_the_loss_receives(tiny_cache, tmp_path, monkeypatch):
    """Anchors rounded on their way to the loss (here: to bf16) stop training before step 1."""
    from dadpo_offline.train.dpo import DadpoTrainer

    exact = DadpoTrainer.anchors_for
    monkeypatch.setattr(DadpoTrainer, "anchors_for", lambda self, inputs: exact(self, inputs).bfloat16().double())
    m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path}", "train.max_steps=1"])
    with pytest.raises(TrainError, match=r"anchors the loss receives differ from the cache by at most [0-9.]+ nats "
                                         r"— the loss would not receive the cached ref_chosen_logp"):
        train_dadpo(m, quiet=True)
    assert not (tmp_path / "dadpo" / "checkpoint-1").exists()


def test_nonfinite_loss_stops_with_the_step_and_batch(tiny_cache, tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer.json").write_bytes((tiny_student / "tokenizer.json").read_bytes())
    (tmp_path / "broken" / "tokenizer_config.json").write_bytes((tiny_student / "tokenizer_config.json").read_bytes())
    m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path}", f"train.init_model={tmp_path / 'broken'}",
                                          "train.step0_pairs=0", "train.max_steps=2"])
    with pytest.raises(TrainError, match=r"non-finite loss nan at step 1, batch of pairs \["):
        train_dadpo(m, quiet=True)
    assert not (tmp_path / "dadpo" / "model.safetensors").exists()


def test_step0_check_fires_on_a_wrong_reference(tiny_cache, smollm2_dir, tmp_path):
    wrong = build_tiny_student(tmp_path / "other", smollm2_dir, seed=1)
    m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path}", f"train.init_model={wrong}"])
    with pytest.raises(TrainError, match=r"step-0 check over 16 sequences .* above 0.001 \(train.step0_max_token_gap's "
                                         r"default for float32 scores, float32 training\)"):
        train_dadpo(m, quiet=True)


def test_step0_default_tolerance_catches_a_slightly_moved_reference(tiny_cache, tiny_student, tmp_path):
    """The reference after one small update (its final norm scaled by 1.1) is off by less than the old
    flat 0.05 nats/token, which let it through; the fp32 default (1e-3) does not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.1)
    moved = tmp_path / "moved"
    model.save_pretrained(moved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (moved / name).write_bytes((tiny_student / name).read_bytes())
    settings = FAST + [f"train.output_dir={tmp_path}", f"train.init_model={moved}", "train.max_steps=1"]
    with pytest.raises(TrainError, match=r"per token mean (0\.00[1-9]|0\.0[1-4]).* above 0.001 "):
        train_dadpo(load_manifest(tiny_cache, settings), quiet=True)
    result = train_dadpo(load_manifest(tiny_cache, settings + ["train.step0_max_token_gap=0.05"]), quiet=True)
    assert 1e-3 < result["step0"]["token_mean"] < 0.05


KILLER = textwrap.dedent("""
    import os, signal, sys
    import transformers.trainer as trainer_module
    from transformers import TrainerCallback
    from dadpo_offline.manifest import load_manifest
    from dadpo_offline.train.dpo import train_dadpo
    from dadpo_offline.train.sft import train_sft

    stage, moment, manifest, *overrides = sys.argv[1:]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class KillAtStep3(TrainerCallback):  # checkpoint-2 is complete, step 3 is done but not saved
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                die()

    if moment == "folder-appears":  # checkpoint-4/ has just been created, nothing in it yet
        makedirs = trainer_module.os.makedirs
        def makedirs_then_die(path, *args, **kwargs):
            makedirs(path, *args, **kwargs)
            if str(path).endswith("checkpoint-4"):
                die()
        trainer_module.os.makedirs = makedirs_then_die
    elif moment == "before-state":  # weights, optimiser, scheduler and RNG of checkpoint-4 written, state not yet
        save_to_json = trainer_module.TrainerState.save_to_json
        def save_then_die(self, path):
            if "checkpoint-4" in str(path):
                die()
            save_to_json(self, path)
        trainer_module.TrainerState.save_to_json = save_then_die
    callbacks = [KillAtStep3()] if moment == "step-3" else []
    train = {"sft": train_sft, "dadpo": train_dadpo}[stage]
    train(load_manifest(manifest, overrides), callbacks=callbacks, quiet=True)
""")

RESUME_SETTINGS = [f"{stage}.{setting}" for stage in ("sft", "train") for setting in (
    "report_to=[]", "learning_rate=0.001", "warmup_ratio=0.25", "batch_size=4", "micro_batch_size=2", "max_steps=6",
    "save_steps=2", "save_total_limit=5", "logging_steps=5")] + ["train.step0_pairs=2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tmp_path_factory):
    """The reference runs: 6 steps of 4 pairs (crossing an epoch: 12 pairs = 3 steps), linear schedule
    with warmup, a checkpoint every 2 steps, the loss logged at step 1 and 5 (and at each save)."""
    from dadpo_offline.train.sft import train_sft

    out = tmp_path_factory.mktemp("uninterrupted")
    m = load_manifest(tiny_cache, RESUME_SETTINGS + [f"train.output_dir={out}"])
    return {"sft": train_sft(m, quiet=True), "dadpo": train_dadpo(m, quiet=True)}


@pytest.mark.parametrize("stage, moment, resumes_from", [
    ("dadpo", "step-3", "checkpoint-2"),  # a kill between checkpoints
    ("dadpo", "folder-appears", "checkpoint-2"),  # kills during the save of checkpoint-4
    ("dadpo", "before-state", "checkpoint-2"),
    ("sft", "folder-appears", "checkpoint-2"),
])
def test_resume_after_kill_reaches_the_uninterrupted_final_state(tiny_cache, tmp_path, capfd, uninterrupted, stage,
                                                                 moment, resumes_from):
    """kill -9, rerun, compare with the uninterrupted run: final weights, last logged loss and the
    whole-run train_loss. A checkpoint the kill left half-written is removed with one line."""
    from safetensors.torch import load_file

    from dadpo_offline.train.sft import train_sft

    killed = RESUME_SETTINGS + [f"train.output_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", KILLER, stage, moment, str(tiny_cache), *killed], capture_output=True,
                          text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / stage
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-4").is_dir() == (moment != "step-3")
    assert not (out / "model.safetensors").exists()
    resumed = {"sft": train_sft, "dadpo": train_dadpo}[stage](load_manifest(tiny_cache, killed), quiet=True)
    assert resumed["resumed_from"].endswith(resumes_from) and resumed["steps"] == 6
    if moment != "step-3":
        assert (f"{stage}/checkpoint-4 is incomplete (the run stopped while saving it): removed"
                in capfd.readouterr().err)
    straight = uninterrupted[stage]
    a = load_file(tmp_path / stage / "model.safetensors")
    b = load_file(straight["output_dir"] + "/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert resumed["history"][-1]["loss"] == pytest.approx(straight["history"][-1]["loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    moved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(moved[n], a[n]) for n in a)  # steps 3-6 did change the weights


def test_sft_examples_are_the_ids_the_reference_was_scored_on(tiny_cache):
    """The teacher here has another tokenizer, so dSFT re-templates its text with the student's
    template exactly as the score stage did: the ids must equal the cached chosen ids."""
    from dadpo_offline.core.models import resolve_model
    from dadpo_offline.core.chat import load_chat_format
    from dadpo_offline.train.data import load_sft_examples

    m = load_manifest(tiny_cache)
    examples = load_sft_examples(m.cache_dir, load_chat_format(resolve_model(m.student.model)))
    chosen = {(p["prompt_id"], p["chosen_sample"]): p for p in load_pairs(m.cache_dir)}
    assert len(examples) == 12
    for e in examples:
        pair = chosen[(e["prompt_id"], e["sample"])]
        assert e["input_ids"] == pair["chosen_input_ids"] and e["prompt_len"] == pair["chosen_prompt_len"]


def test_nonfinite_gradient_stops_before_the_optimiser_step():
    """The callback itself, on a real model whose gradient holds an inf."""
    from transformers import TrainerControl, TrainerState

    from dadpo_offline.train.dpo import FiniteGradients

    model = tiny_llama()
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    FiniteGradients().on_pre_optimizer_step(None, TrainerState(), TrainerControl(), model=model)  # finite: passes
    model.model.layers[1].mlp.up_proj.weight.grad[0, 0] = float("inf")
    state = TrainerState()
    state.global_step = 6
    with pytest.raises(TrainError, match=r"non-finite gradients at step 7 in 1 tensors \(first: model.layers.1.mlp.up_proj.weight\)"):
        FiniteGradients().on_pre_optimizer_step(None, state, TrainerControl(), model=model)


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_cache, tmp_path):
    """4 pairs per step as 2 micro-batches of 2 (accumulated) or 1 of 4: same pairs (same seed),
    so the same loss and the same pre-clip gradient norm — the loss is divided by the steps once."""
    runs = {}
    for micro in (2, 4):
        m = load_manifest(tiny_cache, FAST + [f"train.output_dir={tmp_path / str(micro)}", "train.batch_size=4",
                                              f"train.micro_batch_size={micro}", "train.max_steps=1",
                                              "train.step0_pairs=0"])
        runs[micro] = train_dadpo(m, quiet=True)["history"][0]
    assert runs[2]["loss"] == pytest.approx(runs[4]["loss"], rel=1e-5)
    assert runs[2]["grad_norm"] == pytest.approx(runs[4]["grad_norm"], rel=1e-4)
    assert runs[2]["rewards/margins"] == pytest.approx(runs[4]["rewards/margins"], rel=1e-5)
