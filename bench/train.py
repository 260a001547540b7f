"""Benchmark of phase two ("train"): our daDPO step against the baselines, same batches, one run.

    python bench/train.py [CACHE_DIR] [--pairs 2] [--steps 3] [--rounds 2]
    python bench/train.py [CACHE_DIR] --interleave 5     # step times only, drift-resistant

Configurations, each in its own child process (peak memory is per process), all on the same
pool of cached pairs (the first (steps+1)·pairs of the `pairs` view; the first step is warm-up
and is not timed):

  bare   hand loop, the minimum: policy forward (the same response-position log-probs as ours:
         `logits_to_keep` and a logsumexp, nothing else) + sigmoid daDPO against constant anchors
         + backward + AdamW step. No clipping, no checks, no Trainer: the floor.
  policy the same Trainer and log-prob code as ours, loss = −mean policy log-prob: policy-only
         training, to isolate what the cached numbers and the daDPO loss add.
  ours   `DadpoTrainer` (transformers Trainer, grad-norm clipping, finite-gradient check), daDPO
         with reference and teacher numbers read from the cache.
  naive  the bare loop plus resident reference and teacher models scored every step (no_grad):
         what daDPO costs without a cache.
  live   TRL-style DPO: our Trainer, but the reference log-probs come from a resident reference
         copy scored every step (no teacher), as DPOTrainer does without precomputation.
  lora   `ours` with a LoRA student (train.peft: rank 16, alpha 32, dropout 0.05, all-linear):
         the same loss and batches, only the adapter trained, the base frozen.

Reported: the fastest step's seconds per 1,000 tokens (batches differ slightly in length: ours
shuffles the same pool with the Trainer's seeded sampler; the minimum over steps and --rounds
resists other jobs' load on a shared machine), peak memory (CUDA max allocated on GPUs, peak RSS on
CPUs), and the ratios the issue asks for:
  (a) ours ÷ bare time (target ≤ 1.02); (b) ours ÷ naive memory, and ours ÷ policy-only memory
  (the cache may add ≤ 5% over policy-only training); (c) ours ÷ live time; and LoRA ÷ full
  fine-tuning (lora ÷ ours), step time and peak memory.
Results on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

CONFIGS = ["bare", "policy", "ours", "naive", "live", "lora"]
ROOT = Path(__file__).resolve().parent.parent


def cached_models(cache_dir: str) -> tuple[str, str]:
    """(reference model, teacher model) the cache was scored with: the stage settings name a local
    model by its folder only, so the paths come from the resolved manifest beside the shards."""
    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.manifest import load_manifest

    cache = open_cache(cache_dir)
    with cache.connect() as con:
        (fingerprint,) = con.execute("SELECT fingerprint FROM stages WHERE active AND stage = 'score-reference'").fetchone()
    manifest = load_manifest(cache.stage_dir("score-reference", fingerprint) / "manifest.yaml")
    return manifest.reference_model.model, manifest.teacher.model


def peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def response_logps(model, batch):
    """The least work that yields the loss's inputs: log-probs of response positions only, summed."""
    from dadpo_offline.train.logps import token_logps

    logps, _, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], batch["seq_lens"])
    return logps.sum(-1)


def run_child(config: str, cache_dir: str, pairs: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dadpo_offline.train.data import PairCollator, RowDataset, load_pairs
    from dadpo_offline.train.runs import load_causal_lm

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = load_pairs(cache_dir, limit=(steps + 1) * pairs)
    reference, teacher = cached_models(cache_dir)
    policy, tokenizer, _ = load_causal_lm(reference)
    if config == "lora":
        from dadpo_offline.manifest import PeftConfig
        from dadpo_offline.train.lora import attach_adapter

        policy = attach_adapter(policy, PeftConfig(rank=16, alpha=32.0, dropout=0.05), False, 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PairCollator(pad)
    batches = [collate([{**r, "index": k * pairs + i} for i, r in enumerate(rows[k * pairs:(k + 1) * pairs])])
               for k in range(steps + 1)]
    cached = rows.anchors().to(device)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    beta1, beta2 = 0.1, 0.01
    times: list[float] = []
    if config in ("bare", "naive"):
        policy.to(device).train()
        frozen = []
        if config == "naive":
            frozen = [load_causal_lm(m)[0].to(device).eval().requires_grad_(False) for m in (reference, teacher)]
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            sync(device)
            start = time.perf_counter()
            logps = response_logps(policy, b)
            if frozen:
                with torch.no_grad():
                    ref, te = (response_logps(m, b) for m in frozen)  # same ids: the bench cache shares a tokenizer
                anchors = [ref.double().chunk(2), te.double().chunk(2)]
            else:
                ref_w, ref_l, te_w, te_l = cached[b["pair_index"]].unbind(-1)
                anchors = [(ref_w, ref_l), (te_w, te_l)]
            c, r = logps.double().chunk(2)
            z = beta1 * ((c - anchors[0][0]) - (r - anchors[0][1])) + beta2 * ((c - anchors[1][0]) - (r - anchors[1][1]))
            (-F.logsigmoid(z)).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
    else:
        import tempfile

        from transformers import PrinterCallback, TrainerCallback, TrainingArguments

        from dadpo_offline.train.dpo import DadpoTrainer, FiniteGradients
        from dadpo_offline.train.logps import sequence_logps

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync(device)
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync(device)
                times.append(time.perf_counter() - self.start)

        seen: list[int] = []

        def counting_collate(features):
            batch = collate(features)
            seen.append(int(batch["attention_mask"].sum()))
            return batch

        trainer_cls = DadpoTrainer
        if config == "live":
            ref_model = load_causal_lm(reference)[0].to(device).eval().requires_grad_(False)

            trainer_cls = live_reference_trainer(ref_model)
        elif config == "policy":
            class PolicyOnlyTrainer(DadpoTrainer):
                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                    return -sequence_logps(model, inputs).mean()

            trainer_cls = PolicyOnlyTrainer
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, max_steps=steps + 1,
                                 learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                                 report_to="none", remove_unused_columns=False, disable_tqdm=True,
                                 dataloader_pin_memory=device.type == "cuda", bf16=False, seed=0)
        trainer = trainer_cls(model=policy, args=args, train_dataset=RowDataset(rows), data_collator=counting_collate,
                              anchors=rows.anchors(), loss_name="dadpo" if config in ("ours", "lora") else "ddpo",
                              beta1=beta1, beta2=beta2 if config in ("ours", "lora") else 0.0,
                              callbacks=[FiniteGradients(), Clock()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        tokens = seen
    measured = times[1:]
    per_1k = [1000 * t / n for t, n in zip(measured, tokens[1:len(times)])]
    return {"config": config, "device": device.type, "steps": len(measured), "tokens": sum(tokens[1:len(times)]),
            "seconds": sum(measured), "s_per_step": sum(measured) / len(measured),
            "s_per_1k_tokens": min(per_1k), "peak_mib": peak_mib(device)}


def run_interleaved(cache_dir: str, pairs: int, rounds: int) -> dict:
    """Step times only, one process, configs taking turns on the same batch every round.

    On a shared machine other jobs' load drifts over minutes; alternating single steps exposes
    every config to the same drift. `ours`/`live` run the Trainer's own step (`training_step`,
    gradient clipping, the finite-gradient check, its fused AdamW), not a re-implementation.
    """
    import tempfile

    import torch
    import torch.nn.functional as F
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dadpo_offline.train.data import PairCollator, RowDataset, load_pairs
    from dadpo_offline.train.dpo import DadpoTrainer, FiniteGradients
    from dadpo_offline.manifest import PeftConfig
    from dadpo_offline.train.lora import attach_adapter
    from dadpo_offline.train.runs import load_causal_lm

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = load_pairs(cache_dir, limit=pairs)
    reference, teacher = cached_models(cache_dir)
    policy, tokenizer, _ = load_causal_lm(reference)
    policy.to(device).train()
    ref_model, te_model = (load_causal_lm(m)[0].to(device).eval().requires_grad_(False) for m in (reference, teacher))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {k: v.to(device) for k, v in PairCollator(pad)([{**r, "index": i} for i, r in enumerate(rows)]).items()}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, learning_rate=1e-6,
                             report_to="none", remove_unused_columns=False, disable_tqdm=True,
                             dataloader_pin_memory=device.type == "cuda")
    trainer = DadpoTrainer(model=policy, args=args, train_dataset=RowDataset(rows), data_collator=PairCollator(pad),
                           anchors=rows.anchors(), loss_name="dadpo", beta1=0.1, beta2=0.01)
    live = live_reference_trainer(ref_model)(model=policy, args=args, train_dataset=RowDataset(rows),
                                             data_collator=PairCollator(pad), anchors=rows.anchors(), loss_name="dadpo",
                                             beta1=0.1, beta2=0.01)
    optimizer = trainer.create_optimizer()  # one optimiser for both Trainer paths, stepped below
    lora_policy = attach_adapter(load_causal_lm(reference)[0], PeftConfig(rank=16, alpha=32.0, dropout=0.05), False, 0)
    lora_policy.to(device).train()
    lora = DadpoTrainer(model=lora_policy, args=args, train_dataset=RowDataset(rows), data_collator=PairCollator(pad),
                        anchors=rows.anchors(), loss_name="dadpo", beta1=0.1, beta2=0.01)
    lora_optimizer = lora.create_optimizer()  # the adapter's parameters only
    for which in (trainer, live, lora):
        which.current_gradient_accumulation_steps = 1  # set by the Trainer loop, which this bypasses
    cached = rows.anchors().to(device)
    adamw = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    check = FiniteGradients()

    def hand_step(anchors_live: bool):
        logps = response_logps(policy, batch)
        if anchors_live:
            with torch.no_grad():
                ref, te = (response_logps(m, batch).double().chunk(2) for m in (ref_model, te_model))
        else:
            ref_w, ref_l, te_w, te_l = cached[batch["pair_index"]].unbind(-1)
            ref, te = (ref_w, ref_l), (te_w, te_l)
        c, r = logps.double().chunk(2)
        z = 0.1 * ((c - ref[0]) - (r - ref[1])) + 0.01 * ((c - te[0]) - (r - te[1]))
        (-F.logsigmoid(z)).mean().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    def trainer_step(which):
        which.training_step(policy, batch)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        check.on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=policy)
        optimizer.step()
        policy.zero_grad(set_to_none=True)

    def lora_step():
        lora.training_step(lora_policy, batch)
        torch.nn.utils.clip_grad_norm_([p for p in lora_policy.parameters() if p.requires_grad], 1.0)
        check.on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=lora_policy)
        lora_optimizer.step()
        lora_policy.zero_grad(set_to_none=True)

    steps = {"bare": lambda: hand_step(False), "ours": lambda: trainer_step(trainer),
             "naive": lambda: hand_step(True), "live": lambda: trainer_step(live), "lora": lora_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(rounds + 1):  # round 0 warms up every path
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()} | {"tokens": int(batch["attention_mask"].sum()),
                                                                        "rounds": rounds, "device": device.type}


def live_reference_trainer(ref_model):
    """TRL-style: the reference log-probs come from a resident copy scored every step."""
    import torch

    from dadpo_offline.train.dpo import DadpoTrainer
    from dadpo_offline.train.logps import sequence_logps

    class LiveReferenceTrainer(DadpoTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                self.live_reference = sequence_logps(ref_model, inputs).double()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def anchors_for(self, inputs):
            cached = super().anchors_for(inputs).clone()
            cached[:, 0], cached[:, 1] = self.live_reference.chunk(2)
            return cached

    return LiveReferenceTrainer


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", nargs="?", default=str(ROOT / "runs" / "demo" / "cache"))
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset to run")
    parser.add_argument("--interleave", type=int, metavar="ROUNDS",
                        help="time only: one process, configs alternate single steps for ROUNDS rounds (median)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every config; report the minimum of each figure")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.cache_dir, args.pairs, args.steps)))
        return
    if args.interleave:
        t = run_interleaved(args.cache_dir, args.pairs, args.interleave)
        print(f"interleaved step times, median of {t['rounds']} rounds, {args.pairs} pairs = {t['tokens']} tokens, "
              f"{t['device']}:")
        for name in ("bare", "ours", "naive", "live", "lora"):
            print(f"  {name:<6} {t[name]:.3f} s")
        print(f"(a) ours / bare time        {t['ours'] / t['bare']:.3f}  (target <= 1.02)")
        print(f"(c) ours / live-ref time    {t['ours'] / t['live']:.3f}")
        print(f"    naive / bare time       {t['naive'] / t['bare']:.3f}")
        print(f"    lora / ours time        {t['lora'] / t['ours']:.3f}  (LoRA vs full fine-tuning)")
        return
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):  # rounds interleave the configs, so load drift hits them all
        for config in args.configs.split(","):
            print(f"round {round_ + 1}: running {config} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, args.cache_dir, "--pairs", str(args.pairs), "--steps",
                                   str(args.steps), "--child", config], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{config} failed")
            new = json.loads(proc.stdout.strip().splitlines()[-1])
            old = results.get(config)
            results[config] = new if old is None else {**new, **{k: min(old[k], new[k]) for k in
                                                                ("s_per_step", "s_per_1k_tokens", "peak_mib")}}
    print(f"{'config':<7} {'s/step':>8} {'s/1k tok':>9} {'peak MiB':>9}  ({args.pairs} pairs/step, {args.steps} timed steps, "
          f"{next(iter(results.values()))['device']})")
    for r in results.values():
        print(f"{r['config']:<7} {r['s_per_step']:>8.3f} {r['s_per_1k_tokens']:>9.3f} {r['peak_mib']:>9.0f}")
    ratio = lambda a, b, key: results[a][key] / results[b][key] if a in results and b in results else float("nan")
    print(f"(a) ours / bare time        {ratio('ours', 'bare', 's_per_1k_tokens'):.3f}  (target <= 1.02)")
    print(f"(b) ours / naive memory     {ratio('ours', 'naive', 'peak_mib'):.3f}")
    print(f"    ours / policy memory    {ratio('ours', 'policy', 'peak_mib'):.3f}  (target <= 1.05: what the cache adds)")
    print(f"    ours / bare memory      {ratio('ours', 'bare', 'peak_mib'):.3f}  (Trainer + cache vs hand loop)")
    print(f"    ours / policy time      {ratio('ours', 'policy', 's_per_1k_tokens'):.3f}")
    print(f"(c) ours / live-ref time    {ratio('ours', 'live', 's_per_1k_tokens'):.3f}")
    print(f"    naive / bare time       {ratio('naive', 'bare', 's_per_1k_tokens'):.3f}")
    print(f"    lora / ours time        {ratio('lora', 'ours', 's_per_1k_tokens'):.3f}  (LoRA vs full fine-tuning)")
    print(f"    lora / ours memory      {ratio('lora', 'ours', 'peak_mib'):.3f}")


if __name__ == "__main__":
    main()
