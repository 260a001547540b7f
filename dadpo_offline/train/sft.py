"""`dadpo-offline train --stage sft`: dSFT, the student fine-tuned on the teacher's responses.

The result is the reference π_ref of daDPO and its starting point. Loss: mean token
cross-entropy on response tokens only (prompt and padding labelled −100), in the student's own
chat template, on token ids from the cache (see `data.load_sft_examples`).

Recipe: read teacher responses → load the student → Trainer loop (resuming
from the newest checkpoint) → save a Hugging Face model directory (with `sft.peft`: a LoRA adapter and
its merged model, see lora.py) with tokenizer, chat template, resolved manifest and model card. Next: point the manifest's `reference:` at it and rescore.
"""
from __future__ import annotations

from transformers import PrinterCallback, Trainer

from ..cache.index import open_cache
from ..core.chat import load_chat_format
from ..core.layout import RunLayout
from ..core.models import resolve_model
from ..manifest import Manifest
from .data import RowDataset, SftCollator, load_sft_examples
from .dpo import EchoLogs, FiniteGradients
from .runs import (CheckpointCare, finished_run, load_causal_lm, resume_checkpoint, run_identity, save_final,
                   card_settings, training_arguments, whole_run_loss)


def train_sft(manifest: Manifest, callbacks: list | None = None, quiet: bool = False) -> dict:
    t = manifest.sft
    output = RunLayout.of(manifest).stage("sft")
    data = open_cache(manifest.cache_dir).ready_fingerprint("generate-teacher", "generate")
    student = resolve_model(manifest.student.model, manifest.student.revision)
    identity = run_identity("sft", data, student, t)
    done = finished_run(output, identity, t, "loss")
    if done:
        return done
    fmt = load_chat_format(student, manifest.student.end_of_turn, manifest.student.chat_template)
    examples = load_sft_examples(manifest.cache_dir, fmt)  # before the weights: a damaged cache fails fast
    model, tokenizer, _ = load_causal_lm(manifest.student.model, manifest.student.revision, t)
    tokenizer.chat_template = fmt.tokenizer.chat_template  # saved with the model: the reference needs its template
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.end_of_turn_id
    args = training_arguments(t, output, "sft")
    trainer = Trainer(model=model, args=args, train_dataset=RowDataset(examples), data_collator=SftCollator(pad_id),
                      processing_class=tokenizer,
                      callbacks=[FiniteGradients(), CheckpointCare()] + ([] if quiet else [EchoLogs()]) + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)  # it prints to stdout, which carries only the summary
    resume_from = resume_checkpoint(output, t.resume, identity)
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_loss = whole_run_loss(trainer.state, result.training_loss, resume_from)
    tokens = sum(len(e["input_ids"]) - e["prompt_len"] for e in examples)
    history = [h for h in trainer.state.log_history if "loss" in h]
    card = {"stage": "dsft", "title": f"dSFT of {manifest.student.model} on {manifest.chosen_teacher.model}",
            "summary": "The student fine-tuned on the teacher's responses (loss on response tokens only, student "
                       "chat template). Use it as the manifest's `reference:` and as the daDPO starting point; "
                       "then rescore: dadpo-offline precompute MANIFEST --stage score.",
            "data": {"cache_dir": manifest.cache_dir, "teacher": manifest.chosen_teacher.model, "examples": len(examples),
                     "response_tokens": tokens, "split": "train"},
            "settings": card_settings("sft", t),
            "metrics": history[-1] if history else {}}
    save_final(trainer, tokenizer, manifest, t, output, card, train_loss, student)
    return {"output_dir": str(output), "steps": trainer.state.global_step, "examples": len(examples),
            "train_loss": train_loss, "resumed_from": resume_from, "history": history}
