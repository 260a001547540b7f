"""`dadpo-offline train --stage dadpo`: daDPO / dDPO / rDPO from the cache, only the policy in memory.

Recipe: read pairs from the cache → load the policy (the dSFT reference by
default; with `train.peft`, a fresh LoRA adapter on it) → step-0 check against the cached reference log-probs → Trainer loop (resuming from
the newest checkpoint) → save model, tokenizer, manifest and model card.

The Trainer subclass overrides only public methods: `compute_loss` (policy sequence log-probs
against the cached reference and teacher numbers, through a named loss from `losses.LOSSES`)
and `log` (adds the daDPO metrics). Checkpoints, resume, gradient accumulation, schedules,
bf16, gradient checkpointing, TensorBoard and `accelerate launch` (DDP, FSDP, DeepSpeed) are the
Trainer's own.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback

from ..cache.index import open_cache
from ..core.layout import RunLayout
from ..core.models import ResolvedModel, resolve_model
from ..errors import TrainError
from ..losses import LOSSES
from ..manifest import Manifest, TrainConfig
from .check import step0_check
from .data import PairCollator, RowDataset, load_pairs
from .logps import sequence_logps
from .runs import (CheckpointCare, finished_run, load_causal_lm, resume_checkpoint, run_identity, save_final,
                   card_settings, training_arguments, whole_run_loss)

METRICS = ["ref_margin", "teacher_margin", "ref_term", "teacher_term", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


class DadpoTrainer(Trainer):
    """Trainer whose loss is a registered preference loss of cached and policy log-probs."""

    def __init__(self, *args, anchors: torch.Tensor, loss_name: str, beta1: float, beta2,
                 loss_params: dict | None = None, scorers: tuple[str, ...] = ("teacher",), **kwargs):
        super().__init__(*args, **kwargs)
        self.anchors = anchors  # [pairs, 2 + 2·teachers] float64 (`Rows.anchors`); moved to the loss's device once
        self.loss_fn = LOSSES[loss_name]
        self.beta1, self.beta2, self.loss_params = beta1, beta2, loss_params or {}  # beta2: a tuple with several teachers
        self.scorers = tuple(scorers)  # the teachers' `scores.scorer` names, in the anchors' order
        several = isinstance(beta2, tuple)
        self.metrics = METRICS + ([f"teacher_margin/{name}" for name in self.scorers] if several else [])
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self._sums = None  # on the loss's device: metrics, pair count, tokens; read only when logging (no syncs)
        self._clock = time.perf_counter()

    def anchors_for(self, inputs: dict) -> torch.Tensor:
        """The cached log-probs of the batch's pairs, exactly as stored: they never pass through
        the Trainer's input preparation, so no DeepSpeed or autocast dtype can round them."""
        index = inputs["pair_index"]
        if self.anchors.device != index.device:
            self.anchors = self.anchors.to(index.device)
        return self.anchors[index]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        anchors = self.anchors_for(inputs)
        n = len(self.scorers)
        teacher_chosen, teacher_rejected = anchors[:, 2:2 + n], anchors[:, 2 + n:]
        if not isinstance(self.beta2, tuple):  # one teacher: today's [pairs] tensors
            teacher_chosen, teacher_rejected = teacher_chosen[:, 0], teacher_rejected[:, 0]
        out = self.loss_fn(chosen, rejected, anchors[:, 0], anchors[:, 1], teacher_chosen, teacher_rejected,
                           self.beta1, self.beta2, **self.loss_params)
        loss = out.losses.mean()
        if not torch.isfinite(loss):
            rows = inputs["pair_index"].tolist()
            raise TrainError(f"non-finite loss {loss.item()} at step {self.state.global_step + 1}, batch of pairs "
                             f"{rows} (z = {out.z.tolist()}); no checkpoint was written for this step. Check those "
                             "rows with: dadpo-offline sql CACHE \"SELECT * FROM pairs\" and lower train.learning_rate")
        if model.training:
            with torch.no_grad():
                margins = out.teacher_margin.reshape(len(out.z), -1)  # [pairs, teachers]; teacher_margin: their mean
                values = [out.ref_margin, margins.mean(-1), out.beta1 * out.ref_margin, out.teacher_term,
                          out.rewards_chosen, out.rewards_rejected, out.z, (out.z > 0).double(), chosen.double(),
                          rejected.double()] + (list(margins.T) if len(self.metrics) > len(METRICS) else []) \
                    + [torch.ones_like(out.z), inputs["attention_mask"].double()]
                step = torch.stack([v.detach().sum() for v in values])
                self._sums = step if self._sums is None else self._sums + step
        loss = loss.to(torch.float32)
        return (loss, {"logps": logps}) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the daDPO metrics, averaged over pairs since the last log (and over processes)."""
        if "loss" in logs and self._sums is not None:
            totals = self._sums
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, "sum")
            *sums, pairs, tokens = totals.cpu().tolist()
            logs.update({name: value / pairs for name, value in zip(self.metrics, sums)})
            now = time.perf_counter()
            logs["tokens_per_second"] = tokens / max(now - self._clock, 1e-9)
            self._sums, self._clock = None, now
        super().log(logs, start_time)


class FiniteGradients(TrainerCallback):
    """Stop before the optimiser applies a non-finite gradient: no silent NaN model."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        local = lambda g: g.to_local() if hasattr(g, "to_local") else g  # FSDP2 shards are DTensors
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        # One norm (a scalar per tensor, no copies) is non-finite iff some gradient entry is.
        flag = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)  # every rank stops together, none waits in a collective
        if flag.item():
            bad = [name for name, p in model.named_parameters()
                   if p.grad is not None and not torch.isfinite(local(p.grad)).all()] or ["another process's shard"]
            raise TrainError(f"non-finite gradients at step {state.global_step + 1} in {len(bad)} tensors "
                             f"(first: {bad[0]}); the weights were not updated. Lower train.learning_rate or check "
                             "the batch's cached log-probs")


class Step0Check(TrainerCallback):
    """Runs `check.step0_check` once the Trainer has placed (and, under FSDP, wrapped) the model.

    Skipped on resume: the policy has moved away from the reference by design.
    """

    def __init__(self, trainer, cache_dir: str, pairs: int, max_token_gap: float, policy_name: str, quiet: bool):
        self.trainer, self.cache_dir, self.pairs = trainer, cache_dir, pairs
        self.max_token_gap, self.policy_name, self.quiet = max_token_gap, policy_name, quiet
        self.report = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 or not self.pairs:
            return
        self.report = step0_check(self.trainer, model, self.pairs, self.cache_dir, self.max_token_gap, self.policy_name)
        if not self.quiet and state.is_world_process_zero:
            print(self.report.line(), file=sys.stderr, flush=True)


class EchoLogs(TrainerCallback):
    """One line of metrics per log on stderr (stdout is for the final summary)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            # four significant digits, so that a learning rate of 5e-05 does not print as 0.0001
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items()}
            print(f"step {state.global_step}: {shown}", file=sys.stderr, flush=True)


def dadpo_identity(manifest: Manifest) -> tuple[TrainConfig, str, str | None, ResolvedModel, dict]:
    """The run's settings, start model (reference, revision, resolved) and identity; reads the cache index and
    hashes the start weights, loads nothing."""
    t = manifest.train.this_run()
    init = t.init_model or manifest.reference_model.model
    revision = None if t.init_model else manifest.reference_model.revision
    data = open_cache(manifest.cache_dir).ready_fingerprint("pairs", "score")
    start = resolve_model(init, revision)  # a LoRA dSFT folder: its merged model, base + dSFT adapter
    identity = run_identity(t.loss, data, start, t)
    if manifest.teachers:  # their weights replace train.beta2, which is not used
        del identity["beta2"]
        identity["teachers"] = {teacher.name: teacher.beta2 for teacher in manifest.teachers}
    return t, init, revision, start, identity


def train_dadpo(manifest: Manifest, callbacks: list | None = None, quiet: bool = False,
                output: Path | None = None) -> dict:
    """Train `train.loss` into `output` (default: the run's <train>/<loss> folder; a sweep gives each point its own)."""
    t, init, revision, start, identity = dadpo_identity(manifest)
    beta1, beta2 = LOSSES[t.loss].betas(t.beta1, manifest.teacher_betas(t))  # beta2: one per teacher with teachers:
    scorers = tuple(teacher.name for teacher in manifest.teachers) or ("teacher",)
    output = output or RunLayout.of(manifest).stage(t.loss)
    done = finished_run(output, identity, t, "rewards/margins")
    if done:
        return done | {"step0": None}
    pairs = load_pairs(manifest.cache_dir, teachers=list(scorers) if manifest.teachers else None)
    model, tokenizer, _ = load_causal_lm(init, revision, t)  # with train.peft: a fresh adapter on it
    vocab = model.get_input_embeddings().weight.shape[0]
    top = pairs.max_token_id()
    if top >= vocab:
        raise TrainError(f"cached token id {top} is outside {init}'s vocabulary ({vocab}): the cache was "
                         "built for another student — check the manifest's student and reference")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = training_arguments(t, output, "train")
    trainer = DadpoTrainer(model=model, args=args, train_dataset=RowDataset(pairs), data_collator=PairCollator(pad_id),
                           processing_class=tokenizer, anchors=pairs.anchors(), loss_name=t.loss, beta1=beta1, beta2=beta2,
                           loss_params=t.loss_params.get(t.loss), scorers=scorers,
                           callbacks=[FiniteGradients(), CheckpointCare()] + ([] if quiet else [EchoLogs()])
                           + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)  # it prints to stdout, which carries only the summary
    check = Step0Check(trainer, manifest.cache_dir, t.step0_pairs, t.step0_max_token_gap, init, quiet)
    trainer.add_callback(check)
    resume_from = resume_checkpoint(output, t.resume, identity)
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_loss = whole_run_loss(trainer.state, result.training_loss, resume_from)
    report = check.report
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    card = {"stage": t.loss, "title": f"{t.loss} student from {init}",
            "summary": f"{t.loss} (beta1={beta1}, beta2={_beta2_text(beta2, scorers)}) on {len(pairs)} cached pairs; "
                       "chosen = teacher responses, rejected = student responses; reference and teacher log-probs read "
                       "from the cache.",
            "data": {"cache_dir": manifest.cache_dir, "pairs": len(pairs), "split": "train"},
            "settings": card_settings("train", t), "metrics": history[-1] if history else {}}
    save_final(trainer, tokenizer, manifest, t, output, card, train_loss, start)
    return {"output_dir": str(output), "steps": trainer.state.global_step, "pairs": len(pairs),
            "train_loss": train_loss, "resumed_from": resume_from,
            "step0": report.__dict__ if report else None, "history": history}


def _beta2_text(beta2, scorers: tuple[str, ...]) -> str:
    """0.01, or with several teachers each one's weight by name: {tiny: 0.01, smol: 0.02}."""
    if not isinstance(beta2, tuple):
        return str(beta2)
    return "{" + ", ".join(f"{name}: {b}" for name, b in zip(scorers, beta2)) + "}"
