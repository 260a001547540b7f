"""LoRA and QLoRA students (`sft.peft`, `train.peft`): a fresh adapter on a frozen start model, through `peft`.

The start model is what the stage would fully fine-tune: the student for dSFT, the reference
(the dSFT student, merged) for daDPO. A fresh LoRA adapter adds B·A with B = 0, so at step 0 the
policy is exactly its start model and the step-0 check compares the same numbers as in full
fine-tuning. The cache holds the reference's log-probs, so no second copy of the base and no
adapter toggling is needed.

A finished LoRA stage folder holds the adapter (`adapter_config.json`, `adapter_model.safetensors`,
whose `base_model_name_or_path` is the start model) and `merged/`, the start model with the adapter
merged in, a plain Hugging Face folder. Model resolution (core/models.py) points every engine at
`merged/`; see README "Which student".
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..core.models import MERGED, ResolvedModel
from ..errors import ModelError
from ..files import staged_folder
from ..manifest import PeftConfig

FULL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
              "model.safetensors.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def quantized_base_kwargs(p: PeftConfig | None) -> dict:
    """from_pretrained arguments that load the frozen base in 4-bit NF4 (QLoRA), on the one GPU of this process."""
    if p is None or p.quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "device_map": {"": torch.cuda.current_device()}}


def attach_adapter(model, p: PeftConfig, gradient_checkpointing: bool, seed: int):
    """The model with a fresh, trainable LoRA adapter; every base weight frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if p.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    set_seed(seed)  # the adapter's A matrices are random: same seed, same run
    config = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module name the model does not have
        raise ModelError(f"peft cannot add a LoRA adapter: {str(exc).splitlines()[0]} — check peft.target_modules") from exc


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def clear_other_kind(output: Path, lora: bool) -> None:
    """A stage folder holds one kind of final model: a LoRA run removes an earlier full run's weights, and
    a full run an earlier adapter and its merged model, so resolution never finds a stale one."""
    patterns = FULL_FILES if lora else ADAPTER_FILES
    for pattern in patterns:
        for file in output.glob(pattern):
            file.unlink()
    if not lora:
        shutil.rmtree(output / MERGED, ignore_errors=True)


def save_merged(start: ResolvedModel, output: Path, tokenizer) -> Path:
    """Write `output/merged`: the start model (reloaded unquantized, fp32) with the adapter in `output` merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(start.path, revision=start.load_revision, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(output)).merge_and_unload()
    target = output / MERGED
    shutil.rmtree(target, ignore_errors=True)
    with staged_folder(target) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
