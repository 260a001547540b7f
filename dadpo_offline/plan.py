"""`run --dry-run`: validate a manifest and describe the run — stages, models, tokens, GPU memory.

Nothing is downloaded and no model is loaded, so a typo costs seconds, not a GPU queue slot.
Parameter counts come from a config.json already on disk (a local folder, the converted embedded
model, the offline Hugging Face cache), else from a table of the shipped manifests' models, else
from the name ("7B"). Every figure says where it came from; all of them are estimates.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from .core.engines import pick_backend
from .core.layout import RunLayout
from .core.models import EMBEDDED_MODELS, EMBEDDED_PREFIX, user_cache_dir
from .core.steps import pipeline_steps, trained_losses
from .errors import DadpoError, ManifestError
from .losses import effective_betas
from .manifest import Manifest, PromptsConfig, TrainerConfig

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto is bf16 on the GPUs a plan is for
TRAIN_BYTES_PER_PARAM = 16  # the trainer loads fp32 and autocasts: weights 4 + grads 4 + AdamW's two moments 8
UNKNOWN_PROMPTS = "unknown (hub source without a limit)"


def _config(model_type, vocab, hidden, intermediate, layers, heads, kv_heads, tied, head_dim=None) -> dict:
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                tie_word_embeddings=tied, head_dim=head_dim)


# config.json fields of the shipped manifests' models, so that their plans need no download
KNOWN = {"lmsys/vicuna-7b-v1.5": _config("llama", 32000, 4096, 11008, 32, 32, 32, False),
         "Qwen/Qwen2.5-7B-Instruct": _config("qwen2", 152064, 3584, 18944, 28, 28, 4, False),
         "Qwen/Qwen2.5-1.5B-Instruct": _config("qwen2", 151936, 1536, 8960, 28, 12, 2, True),
         "meta-llama/Llama-3.2-1B-Instruct": _config("llama", 128256, 2048, 8192, 16, 32, 8, True, head_dim=64),
         "HuggingFaceTB/SmolLM2-135M-Instruct": _config("llama", 49152, 576, 1536, 30, 9, 3, True)}
KNOWN[EMBEDDED_PREFIX + "smollm2-135m-instruct"] = KNOWN["HuggingFaceTB/SmolLM2-135M-Instruct"]
NO_CHAT_TEMPLATE = {"lmsys/vicuna-7b-v1.5"}  # their tokenizers ship none: precompute would stop at the first prompt


def plan(manifest: Manifest) -> dict:
    """Check a manifest and describe what `run` will do; raise ManifestError listing every problem at once."""
    m, problems, warnings = manifest, [], []  # what the manifest alone shows was checked when it loaded
    chosen = m.chosen_teacher  # with teachers: the one whose answers are chosen; the others only score
    teacher = describe_model(chosen.model, chosen.revision, chosen.dtype, problems)
    if m.prune.source and not Path(m.student.model).expanduser().exists():
        if m.student.model.startswith(EMBEDDED_PREFIX) or _hub_like(m.student.model):
            problems.append(f"student.model {m.student.model!r}: prune.source needs a local folder to write, "
                            "e.g. ../runs/NAME/student")
        student = pruned(describe_model(m.prune.source, None, m.student.dtype, problems), m.prune.ratio,
                         m.prune.method)
        student["model"] = m.student.model
    else:
        student = describe_model(m.student.model, m.student.revision, m.student.dtype, problems)
    models = {"teacher": teacher, "student": student}
    if m.reference is not None:
        models["reference"] = describe_model(m.reference.model, m.reference.revision, m.reference.dtype, problems)
        warnings.append("run makes the reference itself (dSFT of the student) and refuses a manifest with "
                        "`reference:`; with one, run precompute, train and eval one by one")
    for role, info in models.items():
        template = (chosen if role == "teacher" else getattr(m, role)).chat_template
        if template is not None and not Path(template).is_file():
            problems.append(f"{role}.chat_template: {template} not found")
        elif template is None and (info["model"] in NO_CHAT_TEMPLATE or info.get("source") in NO_CHAT_TEMPLATE):
            warnings.append(f"{role} {info['model']}: its tokenizer has no chat template, and prune and precompute "
                            f"need one: set {role}.chat_template to a Jinja file (see manifests/templates/)")
    for name, config in m.teacher_scorers().values():  # the other teachers: scorers only
        if config is not chosen:
            models[f"teacher {name}"] = describe_model(config.model, config.revision, config.dtype, problems)
            if config.chat_template is not None and not Path(config.chat_template).is_file():
                problems.append(f"teachers ({name}).chat_template: {config.chat_template} not found")
    try:
        prompts = count_prompts(m.prompts)
    except DadpoError as exc:
        problems.append(str(exc))
    if problems:
        raise ManifestError("plan: " + "; ".join(problems))
    judged = [s for s in m.eval.suites if s in ("mtbench", "alpacaeval", "winrate")]
    if judged and not (m.eval.judge.serve or (m.eval.judge.base_url and m.eval.judge.model)):
        warnings.append(f"eval suites {', '.join(judged)} need a judge: eval.judge.base_url and model, or judge.serve")
    sft_dir = RunLayout.of(m).stage("sft")
    return {"name": m.name, "cache_dir": m.cache_dir, "backend": pick_backend(m.engine.backend), "models": models,
            "prompts": prompts, "reference": "the manifest's reference" if m.reference else f"the dSFT student, {sft_dir}",
            "stages": stages(m, models, prompts, sft_dir), "warnings": warnings}


def stages(m: Manifest, models: dict, prompts: dict, sft_dir: Path) -> list[dict]:
    """`run`'s steps in order (core/steps.py), each part with its tokens and GPU memory, and the command that
    runs its step alone."""
    n, p = prompts["count"], prompts["tokens"]
    tt, ts = m.generate.teacher.max_tokens, m.generate.student.max_tokens
    n_t, n_s = m.generate.samples("teacher"), m.generate.samples("student")
    n_pairs = m.pairs.per_prompt(n_t, n_s)
    student, teacher, t = models["student"], models["teacher"], m.train
    reference = models.get("reference", student)  # the dSFT student has the student's size

    def tokens(per_prompt: int, formula: str, epochs: int = 1) -> dict:
        """`formula`: the tokens of one prompt's answers or pairs, samples included."""
        basis = f"prompts × ({formula})" + (f" × {epochs} epochs" if epochs != 1 else "")
        if n is None:
            return {"tokens": UNKNOWN_PROMPTS, "tokens_basis": basis}
        return {"tokens": n * per_prompt * epochs, "tokens_basis": f"{n:,} {basis}"}

    def steps(config, per_prompt: int) -> str:
        return (f"; {-(-n * per_prompt // config.batch_size) * config.epochs:,} optimiser steps of {config.batch_size}"
                if n else "")

    def adapter(config) -> str:
        p = config.peft
        return f"; LoRA rank {p.rank}{' on a 4-bit base (QLoRA)' if p.quantize else ''}, adapter + merged/" if p else ""

    generate = lambda k, samples: tokens(samples * k, f"{samples} samples × {k:,} max_tokens: an upper bound, answers "
                                                      "stop at their end of turn")
    scored = (n_t * (p + tt) + n_s * (p + ts),  # every sample is scored: best_vs_worst ranks them all
              f"{n_t} teacher samples × ({p:,} prompt + {tt:,}) + {n_s} student samples × ({p:,} + {ts:,}) tokens")
    pair = (n_pairs * (2 * p + tt + ts), f"{n_pairs} pairs ({m.pairs.policy}) × (2 × {p:,} prompt + {tt:,} + {ts:,}) tokens")
    losses = trained_losses(m)
    judge = m.eval.judge.serve and f"{m.eval.judge.serve}, served locally" or m.eval.judge.model or "none set"
    parts = {
        "prompts": {"what": "read, de-duplicate and fit the prompts"},
        "generate-student": {"model": "student", "what": "sample y_s (rejected)", **generate(ts, n_s),
                             "memory": inference_memory(student, m, scoring=False)},
        "generate-teacher": {"model": "teacher", "what": "sample y_t (chosen)", **generate(tt, n_t),
                             "memory": inference_memory(teacher, m, scoring=False)},
        "train-sft": {"model": "student", "what": f"dSFT on y_t → {sft_dir}, lr {m.sft.learning_rate:g}" + steps(m.sft, n_t)
                      + adapter(m.sft),
                      **tokens(n_t * (p + tt), f"{n_t} teacher samples × ({p:,} prompt + {tt:,} response) tokens",
                               m.sft.epochs),
                      "memory": train_memory(student, m.sft, sequences=1, length=m.prompts.max_prompt_tokens + tt)},
        **{stage: {"model": "teacher" if name == "teacher" else f"teacher {name}",
                   "what": "log π_te of y_t and y_s, teacher's own tokenizer"
                   + (f"; anchor weight β2={config.beta2:g}" if m.teachers else ""),
                   **tokens(*scored), "memory": inference_memory(models.get(f"teacher {name}", teacher), m, scoring=True)}
           for stage, (name, config) in m.teacher_scorers().items()},
        "score-reference": {"model": "reference", "what": "log π_ref of y_t and y_s, π_ref = "
                            + ("the manifest's reference" if m.reference else "the dSFT student"), **tokens(*scored),
                            "memory": inference_memory(reference, m, scoring=True)},
        "pairs": {"what": f"pair samples by pairs.policy {m.pairs.policy} ({n_pairs} per prompt): join prompts, "
                          "generations and scores per shard (DuckDB, CPU)"},
        "eval": {"model": "teacher", "what": f"{', '.join(m.eval.suites)} for teacher, student, sft, {', '.join(losses)} "
                 f"(judge: {judge}); answers and judgments cached", "memory": inference_memory(teacher, m, scoring=False)},
        "report": {"what": f"plots, report.md and report.html in {RunLayout.of(m).report}"}}
    if "source_info" in student:  # prune.source set and the student folder not made yet
        what = (f"remove {m.prune.ratio:.0%} of every layer's MLP channels and head_ratio {m.prune.head_ratio:g} of "
                "each KV-head group's query heads (width)" if m.prune.method == "width"
                else f"drop {m.prune.ratio:.0%} of the decoder layers")
        parts["prune"] = {"model": "student", "what": f"{what} of "
                          f"{m.prune.source}, ranked on {m.prune.calibration_prompts} built-in prompts, into "
                          f"{m.student.model}", "memory": prune_memory(student["source_info"])}
    for loss in losses:
        beta1, beta2 = effective_betas(loss, t.beta1, m.teacher_betas())
        beta2 = "(" + ", ".join(f"{b:g}" for b in beta2) + ")" if isinstance(beta2, tuple) else f"{beta2:g}"
        parts[f"train-{loss}"] = {"model": "student", "what": f"{loss} from the dSFT student, β1={beta1:g}, β2={beta2}, "
                                  f"lr {t.learning_rate:g}" + steps(t, n_pairs) + adapter(t), **tokens(*pair, t.epochs),
                                  "memory": train_memory(student, t, sequences=2,
                                                         length=m.prompts.max_prompt_tokens + max(tt, ts))}
    out = []
    for step in pipeline_steps(m):
        described = [name for name in step.parts if name in parts]
        out += [{"stage": name, **parts[name]} | ({"command": step.command} if i == 0 else {})
                for i, name in enumerate(described)]
    return out


def prune_memory(source: dict) -> dict:
    """prune holds the source once (bf16 on a GPU) and runs calibration forwards with transformers."""
    if source["params"] is None:
        return {"weights_gb": None, "total_gb": None, "basis": "unknown: no parameter count"}
    weights = source["params"] * 2 / GB
    return {"weights_gb": round(weights, 2), "total_gb": round(weights, 2), "basis": f"source weights {weights:.1f} GB "
            f"({source['params'] / 1e9:.2f}B × 2 B, bf16) + hidden states of the calibration prompts (small)"}


def inference_memory(info: dict, m: Manifest, scoring: bool) -> dict:
    """vLLM: weights, plus KV cache up to gpu_memory_utilization; scoring adds vocabulary-wide logits."""
    if info["params"] is None:
        return {"weights_gb": None, "total_gb": None, "basis": "unknown: no parameter count"}
    per_byte = DTYPE_BYTES[info["dtype"]]
    weights = info["params"] * per_byte / m.engine.tensor_parallel_size / GB
    utilisation = m.engine.gpu_memory_utilization or 0.85
    basis = (f"weights {weights:.1f} GB ({info['params'] / 1e9:.2f}B × {per_byte} B, {info['dtype']}"
             + (f", / tensor_parallel_size {m.engine.tensor_parallel_size}" if m.engine.tensor_parallel_size > 1 else "")
             + f"); KV cache takes the rest of gpu_memory_utilization {utilisation} × GPU memory")
    shapes, total = info.get("shapes"), weights
    if shapes:
        heads = shapes["num_attention_heads"]
        head_dim = shapes.get("head_dim") or shapes["hidden_size"] // heads
        kv = 2 * shapes["num_hidden_layers"] * (shapes.get("num_key_value_heads") or heads) * head_dim * per_byte
        basis += f" ({kv / 1024:.0f} KiB per token)"
        if scoring:
            logits = m.engine.batch_tokens * shapes["vocab_size"] * 4 / GB
            total += logits
            basis += (f"; prompt_logprobs: fp32 logits of engine.batch_tokens {m.engine.batch_tokens} × vocabulary "
                      f"{shapes['vocab_size']:,} = {logits:.1f} GB")
    return {"weights_gb": round(weights, 2), "total_gb": round(total, 2), "basis": basis}


def lora_params(shapes: dict | None, rank: int, targets) -> int | None:
    """Trainable parameters of a LoRA adapter, rank × (in + out) per adapted Linear, on a Llama-style
    decoder; None when the shapes are unknown. Names other than the seven projections adapt nothing here."""
    if not shapes:
        return None
    h, i, layers = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_hidden_layers"]
    heads = shapes["num_attention_heads"]
    head_dim = shapes.get("head_dim") or h // heads
    kv = (shapes.get("num_key_value_heads") or heads) * head_dim
    sizes = {"q_proj": h + heads * head_dim, "k_proj": h + kv, "v_proj": h + kv, "o_proj": heads * head_dim + h,
             "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}  # in + out features
    names = list(sizes) if targets == "all-linear" else [n for n in targets if n in sizes]
    return round(layers * rank * sum(sizes[n] for n in names))


def train_memory(info: dict, t: TrainerConfig, sequences: int, length: int) -> dict:
    """One GPU: full fine-tuning holds 16 B/param of states; LoRA holds the frozen base (fp32, or 4-bit NF4
    decoder layers with QLoRA) plus 16 B per adapter parameter; both plus activations of one micro-batch (rough)."""
    if info["params"] is None:
        return {"states_gb": None, "activations_gb": None, "total_gb": None, "basis": "unknown: no parameter count"}
    if t.peft is None:
        states = info["params"] * TRAIN_BYTES_PER_PARAM / GB
        basis = (f"states {states:.1f} GB ({info['params'] / 1e9:.2f}B × {TRAIN_BYTES_PER_PARAM} B: fp32 weights, "
                 "grads, 2 AdamW moments; FSDP over G GPUs divides it by G)")
    else:
        layers = info.get("layer_params") or 0
        if t.peft.quantize:
            frozen = (layers * 0.5 + (info["params"] - layers) * 4) / GB
            how = f"decoder layers {layers / 1e9:.2f}B × 0.5 B (4-bit NF4), the rest × 4 B (fp32)"
        else:
            frozen, how = info["params"] * 4 / GB, f"{info['params'] / 1e9:.2f}B × 4 B, fp32, no grads or moments"
        adapter = lora_params(info.get("shapes"), t.peft.rank, t.peft.target_modules)
        states = frozen + (adapter or 0) * TRAIN_BYTES_PER_PARAM / GB
        basis = (f"states {states:.1f} GB: frozen base {frozen:.1f} GB ({how}) + LoRA rank {t.peft.rank} adapter "
                 + (f"{adapter / 1e6:.1f}M params × {TRAIN_BYTES_PER_PARAM} B" if adapter is not None
                    else "(size unknown without the model's shapes)"))
    tokens = t.micro_batch_size * sequences * length
    activations = None
    shapes = info.get("shapes")
    if shapes:
        h, i, layers = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_hidden_layers"]
        per_layer = 20 * h + 8 * i  # bf16 projections and MLP, fp32 residual stream, per token (rough)
        kept = 4 * h * layers + per_layer if t.gradient_checkpointing else per_layer * layers
        activations = tokens * (kept + 8 * shapes["vocab_size"]) / GB  # + bf16 logits and fp32 log-softmax
        basis += (f" + activations ≈ {activations:.1f} GB (rough: {tokens:,} tokens = micro_batch_size "
                  f"{t.micro_batch_size} × {sequences} × {length} at most, gradient_checkpointing "
                  f"{'on' if t.gradient_checkpointing else 'off'})")
    total = states + (activations or 0)
    return {"states_gb": round(states, 2), "activations_gb": activations and round(activations, 2),
            "total_gb": round(total, 2), "basis": basis}


def describe_model(reference: str, revision: str | None, dtype: str, problems: list[str]) -> dict:
    """Where a model comes from and how many parameters it has, without loading or fetching it."""
    path, config, where = Path(reference).expanduser(), None, ""
    if reference.startswith(EMBEDDED_PREFIX):
        name = reference[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            problems.append(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
        kind = f"embedded (PyPI package {EMBEDDED_MODELS.get(name, ('?',))[0].replace('_', '-')})"
        config, where = _read_config(user_cache_dir() / "models" / name / "config.json"), "its converted config.json"
    elif path.exists():
        kind, config, where = "local folder", _read_config(path / "config.json"), "its config.json"
        if config is None:
            problems.append(f"model folder {reference} has no config.json (not a Hugging Face model folder)")
    elif _hub_like(reference):
        kind, where = "hub id" + (f" @ {revision}" if revision else ""), "config.json in the offline HF cache"
        config = _read_config(_cached_config(reference, revision))
    else:
        problems.append(f"model {reference!r} does not exist: give a local folder, a hub id or "
                        + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS))
        kind = "missing local folder"
    return {"model": reference, "dtype": dtype, "kind": kind, **(_counted(config, where) if config else _fallback(reference))}


def pruned(source: dict, ratio: float, method: str = "depth") -> dict:
    """The student prune will make: the source with about `ratio` of its decoder-layer parameters removed.

    Width pruning keeps every layer and the hidden size, so its activation shapes stay the source's
    (a safe over-estimate); its exact count depends on head_ratio and rounding, and prune.json holds it."""
    info = {"model": None, "dtype": source["dtype"], "kind": f"local folder, made by prune from {source['model']}",
            "source": source["model"], "source_info": source}
    if source["params"] is None:
        return {**info, "params": None, "layer_params": None, "params_from": "unknown"}
    layers = source["layer_params"] if source["layer_params"] is not None else source["params"]
    shapes = source.get("shapes") and {**source["shapes"], "num_hidden_layers": source["shapes"]["num_hidden_layers"]
                                       * (1 if method == "width" else 1 - ratio)}
    how = "heads and MLP channels go; prune.json has the exact count" if method == "width" else "whole layers go"
    return {**info, "params": round(source["params"] - layers * ratio), "layer_params": round(layers * (1 - ratio)),
            "shapes": shapes, "params_from": f"≈ {source['model']} less {ratio:.0%} of its "
            f"{'decoder-layer ' if source['layer_params'] is not None else ''}parameters (approximate: {how})"}


def count_prompts(config: PromptsConfig) -> dict:
    """How many prompts, and about how long: local sources are read; hub sources are not fetched."""
    from .core.prompts import collect_prompts  # reads prompt files: only when a plan is asked for

    local = [s for s in config.sources if s.hub is None]
    hub = [s for s in config.sources if s.hub is not None]
    count, chars, parts = 0, 0, []
    if local:
        found, _ = collect_prompts(dataclasses.replace(config, sources=local, limit=None))
        count, chars = len(found), sum(len(text) for p in found for _, text in p.messages)
        parts.append(f"{count:,} from {', '.join(f'builtin:{s.builtin}' if s.builtin else Path(s.jsonl).name for s in local)} after de-duplication")
    for s in hub:
        parts.append(f"hub {s.hub}[{s.split}]: " + (f"limit {s.limit:,}" if s.limit else "no limit"))
    if any(s.limit is None for s in hub):
        count = None
    elif hub:
        count += sum(s.limit for s in hub)
    if config.limit is not None:
        count = config.limit if count is None else min(count, config.limit)
        parts.append(f"prompts.limit {config.limit:,}")
    if hub or not count:
        return {"count": count, "basis": "; ".join(parts), "tokens": config.max_prompt_tokens,
                "tokens_basis": f"at most prompts.max_prompt_tokens {config.max_prompt_tokens:,} (hub prompts are not read)"}
    mean = min(config.max_prompt_tokens, round(chars / 4 / len(found)))
    return {"count": count, "basis": "; ".join(parts), "tokens": mean,
            "tokens_basis": "≈ characters / 4 of the prompts read (chat-template tokens not counted)"}


def format_plan(p: dict) -> str:
    """The plan as aligned text: models, prompts, then one block per stage."""
    lines = [f"plan: {p['name']}  (nothing downloaded, no model loaded; every figure is an estimate)",
             f"cache: {p['cache_dir']}", f"backend: {p['backend']}", "models:"]
    for role, info in p["models"].items():
        params = f"{info['params'] / 1e9:.3g}B params" if info["params"] else "? params"
        lines.append(f"  {role:<10} {info['model']}  [{info['kind']}]  {params} ({info['params_from']}), {info['dtype']}")
    lines.append(f"  reference  {p['reference']}")
    pr = p["prompts"]
    lines.append(f"prompts: {pr['count'] if pr['count'] is not None else UNKNOWN_PROMPTS} ({pr['basis']}); "
                 f"{pr['tokens']:,} tokens each ({pr['tokens_basis']})")
    lines.append("stages:")
    for i, s in enumerate(p["stages"], start=1):
        lines.append(f"  {i:>2}. {s['stage']:<17} {('[' + s['model'] + ']') if s.get('model') else ''}  {s['what']}")
        if "tokens" in s:
            value = f"{s['tokens']:,}" if isinstance(s["tokens"], int) else s["tokens"]
            lines.append(f"      tokens: {value}  ({s['tokens_basis']})")
        if s.get("memory"):
            total = s["memory"]["total_gb"]
            lines.append(f"      GPU:    ≈ {'?' if total is None else f'{total:.1f}'} GB  ({s['memory']['basis']})")
        if s.get("command"):
            lines.append(f"      run:    {s['command']}")
    lines += ["warnings:"] + [f"  - {w}" for w in p["warnings"]] if p["warnings"] else []
    return "\n".join(lines)


def _hub_like(reference: str) -> bool:
    return not reference.startswith((".", "/", "~")) and reference.count("/") == 1


def _read_config(path) -> dict | None:
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    return config.get("text_config", config)  # multimodal configs nest the language model's


def _cached_config(repo: str, revision: str | None):
    try:
        from huggingface_hub import try_to_load_from_cache

        return try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # an id the hub client rejects is simply not cached
        return None


def _counted(config: dict, where: str) -> dict:
    counts = param_counts(config)
    if counts is None:
        return {"params": None, "layer_params": None, "params_from": f"unknown ({where} is not Llama-style)"}
    return {"params": counts[0], "layer_params": counts[1], "shapes": config, "params_from": where}


def _fallback(reference: str) -> dict:
    if reference in KNOWN:
        return _counted(KNOWN[reference], "table of known models in plan.py")
    found = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)([bm])(?![a-z])", reference.rsplit("/", 1)[-1], re.IGNORECASE)
    if found:
        scale = 1e9 if found.group(2).lower() == "b" else 1e6
        return {"params": round(float(found.group(1)) * scale), "layer_params": None,
                "params_from": f"parsed from the name ({found.group(0)})"}
    return {"params": None, "layer_params": None, "params_from": "unknown (no config.json offline, no size in the name)"}


def param_counts(c: dict) -> tuple[int, int] | None:
    """(total, decoder layers) of a Llama-style decoder (Llama, Qwen2, Mistral) from its config.json."""
    try:
        h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
        vocab, inter = c["vocab_size"], c["intermediate_size"]
    except KeyError:
        return None
    kv, head_dim = c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    if c.get("attention_bias", c.get("model_type") == "qwen2"):  # Qwen2 has q/k/v biases
        attention += heads * head_dim + 2 * kv * head_dim
    layer = attention + 3 * h * inter + 2 * h  # + gate/up/down MLP, two norms
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return embeddings + h + layers * layer, layers * layer
