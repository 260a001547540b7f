"""What both training stages share: settings checks, Trainer arguments, model loading, outputs.

A stage's output folder holds `checkpoint-N/` folders while it runs (the unit of resume) and,
at the end, a plain Hugging Face model directory (safetensors, tokenizer, chat template), the
resolved manifest and a model card, so the result loads with transformers and vLLM as is. A LoRA
stage (`peft:` set) holds the adapter there instead, and the merged model in `merged/` (lora.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from ..errors import ModelError, TrainError
from ..files import apply_umask
from ..manifest import Manifest, PeftConfig, TrainerConfig, write_resolved
from ..core.models import ResolvedModel, resolve_model
from .lora import attach_adapter, clear_other_kind, quantized_base_kwargs, save_merged


def world_size() -> int:
    """Processes started by `accelerate launch` / torchrun; known before the Trainer exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(t: TrainerConfig, output: Path, section: str):
    from transformers import TrainingArguments

    micro = min(t.micro_batch_size, t.batch_size)
    per_step = micro * world_size()
    if t.batch_size % per_step:
        raise TrainError(f"{section}.batch_size={t.batch_size} is not a multiple of micro_batch_size x GPUs = {per_step}")
    bf16 = t.bf16 if t.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // per_step,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        data_seed=t.seed, bf16=bf16, gradient_checkpointing=t.gradient_checkpointing,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_first_step=True,
        report_to=list(t.report_to) or "none", remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
        save_only_model=False)


def load_causal_lm(reference: str, revision: str | None = None, t: TrainerConfig | None = None):
    """The stage's start model in fp32 (QLoRA: its frozen base in 4 bits), with a fresh LoRA adapter when
    `t.peft` is set, its tokenizer, and what it resolved to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = resolve_model(reference, revision)
    peft: PeftConfig | None = t.peft if t is not None else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, revision=model.load_revision)
        lm = AutoModelForCausalLM.from_pretrained(model.path, revision=model.load_revision,
                                                  dtype=torch.float32, **quantized_base_kwargs(peft))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {reference} for training: {str(exc).splitlines()[0]}") from exc
    if peft is not None:
        lm = attach_adapter(lm, peft, t.gradient_checkpointing, t.seed)
    return lm, tokenizer, model


# Settings that do not change what a finished run computes: a resumed run may differ in them.
RESUME_NEUTRAL = {"resume", "max_steps", "output_dir", "save_steps", "save_total_limit", "logging_steps", "report_to",
                  "step0_pairs", "step0_max_token_gap", "compare"}


def run_identity(stage: str, data_fingerprint: str, start_model: ResolvedModel, t: TrainerConfig) -> dict:
    """What a checkpoint's run was made from: stage, cache data, starting weights, the stage's own settings."""
    settings = {k: v for k, v in settings_dict(t).items() if k not in RESUME_NEUTRAL}
    return {"stage": stage, "data": data_fingerprint, "start_model": start_model.portable_name,
            "start_revision": start_model.revision, **settings}


def resume_checkpoint(output: Path, resume: bool, identity: dict) -> str | None:
    """The newest complete checkpoint to continue from, refused when it belongs to a run with other settings.

    Without the refusal, a sweep (--beta1 0.1, then --beta1 1.0) into one folder would "resume" the
    finished first run, do no step, and save its weights under the second run's settings.
    """
    record = output / "run.json"
    checkpoint = last_complete_checkpoint(output) if resume and output.is_dir() else None
    if checkpoint is not None and record.is_file():
        before = json.loads(record.read_text(encoding="utf-8"))
        changed = sorted(k for k in before.keys() | identity.keys() if before.get(k) != identity.get(k))
        if changed:
            raise TrainError(f"{output} holds checkpoints of a run with other {', '.join(changed)}; resuming would "
                             "continue that run — give another --output-dir, or --no-resume to start over")
    output.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")
    return checkpoint


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def checkpoint_complete(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint holding a readable one for its own step is whole."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state.get("global_step") == checkpoint_step(folder)


def last_complete_checkpoint(output: Path) -> str | None:
    """The newest complete checkpoint-N folder. Newer ones that a kill left half-written are removed
    (the resumed run writes them again), each named in one line on stderr."""
    folders = [f for f in output.iterdir() if f.is_dir() and re.fullmatch(r"checkpoint-\d+", f.name)]
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        if checkpoint_complete(folder):
            return str(folder)
        if int(os.environ.get("RANK", "0")) == 0:  # one process removes it; the others only skip it
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{output.name}/{folder.name} is incomplete (the run stopped while saving it): removed; "
                  "resuming from the previous complete checkpoint, if any", file=sys.stderr, flush=True)
    return None


class CheckpointCare(TrainerCallback):
    """Log the loss at every checkpoint step, so that a resumed run's log covers every step before it;
    give each finished checkpoint the user's file mode."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            apply_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def whole_run_loss(state, training_loss: float, resumed_from: str | None) -> float:
    """Mean loss over every step of the run, resumed or not.

    The Trainer's own figure averages only the steps of the current call; the steps before a
    resume are in the restored log history, which CheckpointCare makes reach the checkpoint's step.
    """
    if resumed_from is None:
        return training_loss
    start = checkpoint_step(Path(resumed_from))
    before, logged = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= start:
            before += entry["loss"] * (entry["step"] - logged)
            logged = entry["step"]
    after = state.global_step - start
    return (before + training_loss * after) / max(logged + after, 1)


def finished_run(output: Path, identity: dict, t: TrainerConfig, history_key: str) -> dict | None:
    """The summary of a finished run with exactly these settings, so that rerunning it is a no-op.

    A run is finished once save_final wrote trainer_state.json (with the max_steps it was asked
    for: a smoke run with --max-steps 2 is not the full run); starting a run removes that file, so
    a crash after a settings change is never mistaken for the old, finished run.
    """
    logged = finished_state(output, identity, t)
    if logged is not None:
        history = [h for h in logged["log_history"] if history_key in h]
        trainer_summary = next((h for h in reversed(logged["log_history"]) if "train_loss" in h), {})  # older runs
        return {"output_dir": str(output), "steps": logged["global_step"],
                "train_loss": logged.get("train_loss", trainer_summary.get("train_loss")),
                "resumed_from": None, "history": history, "skipped": "finished before with the same settings"}
    (output / "trainer_state.json").unlink(missing_ok=True)
    return None


def finished_state(output: Path, identity: dict, t: TrainerConfig) -> dict | None:
    """The final trainer_state.json of a finished run with exactly these settings, else None; only reads,
    so `sweep --dry-run` can ask it too."""
    state, record = output / "trainer_state.json", output / "run.json"
    if t.resume and state.is_file() and record.is_file():
        logged = json.loads(state.read_text(encoding="utf-8"))
        same = json.loads(record.read_text(encoding="utf-8")) == json.loads(json.dumps(identity, sort_keys=True))
        if same and logged.get("requested_max_steps") == t.max_steps:
            return logged
    return None


def save_final(trainer, tokenizer, manifest: Manifest, t: TrainerConfig, output: Path, card: dict,
               train_loss: float, start: ResolvedModel) -> None:
    """Model (LoRA: adapter + merged/) + tokenizer (with chat template) + training log + resolved manifest +
    model card, in the stage folder."""
    if trainer.is_world_process_zero():
        clear_other_kind(output, lora=t.peft is not None)
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        if t.peft is not None:
            save_merged(start, output, tokenizer)
            card = card | {"library": "peft"}
        state = dataclasses.asdict(trainer.state) | {"requested_max_steps": t.max_steps,
                                                     "train_loss": train_loss}
        (output / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")  # `report` plots it
        tokenizer.save_pretrained(str(output))
        write_resolved(manifest, output / "manifest.yaml")
        write_card(output, card)
        apply_umask(output)


def write_card(output: Path, card: dict) -> None:
    lines = ["---", f"library_name: {card.get('library', 'transformers')}", "tags: [dadpo-offline, " + card["stage"] + "]", "---", "",
             f"# {card['title']}", "", card["summary"], "",
             f"Written by dadpo-offline on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             "## Data", "", "```yaml", yaml.safe_dump(card["data"], sort_keys=False).rstrip(), "```", "",
             "## Settings", "", "```yaml", yaml.safe_dump(card["settings"], sort_keys=False).rstrip(), "```", "",
             "## Final metrics", "", "```json", json.dumps(card.get("metrics", {}), indent=1), "```", ""]
    (output / "README.md").write_text("\n".join(lines), encoding="utf-8")


def settings_dict(t: TrainerConfig) -> dict:
    return dataclasses.asdict(t)


def card_settings(section: str, t: TrainerConfig) -> dict:
    """A stage's settings under their manifest keys (sft.learning_rate), ready to pass back as --set."""
    return {f"{section}.{key}": value for key, value in settings_dict(t).items()}
