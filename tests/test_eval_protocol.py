"""eval/ (protocol, tables, data files) agrees with the code and manifests it describes. No models, no network."""
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pyarrow as pa
import yaml

from dadpo_offline.eval import alpacaeval, mtbench, winrate
from dadpo_offline.manifest import (EVAL_SUITES, AlpacaEvalConfig, JudgeConfig, LmEvalConfig, MtBenchConfig,
                                    PromptSource, WinRateConfig, load_manifest)
from dadpo_offline.package_data import MTBENCH_DATA, installed_path
from dadpo_offline.core.prompts import load_source

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "eval"
README = (EVAL / "README.md").read_text(encoding="utf-8")
PAPER_STYLE = ("qwen7b_to_qwen1.5b.yaml", "qwen7b_to_llama1b.yaml", "vicuna7b_pruned.yaml")
INSTRUCTIONS = EVAL / "data" / "alpacaeval_instructions.jsonl"
WINRATE_PROMPTS = EVAL / "data" / "winrate_prompts.jsonl"


def table(name: str) -> dict:
    return yaml.safe_load((EVAL / name).read_text(encoding="utf-8"))


def package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it (lm_eval and alpaca_eval are slow to import)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


def test_lmeval_table_is_the_default_task_list_and_the_paper_style_one():
    tasks = table("lmeval_tasks.yaml")["tasks"]
    shots = {task: row["shots"] for task, row in tasks.items()}
    assert list(shots.items()) == list(LmEvalConfig().tasks.items())
    for name in PAPER_STYLE:
        assert load_manifest(ROOT / "manifests" / name).eval.lmeval.tasks == shots, name
    assert all(row["metric"].startswith(f"{task}/") for task, row in tasks.items())


def test_lmeval_table_matches_lm_evals_task_definitions():
    root = package_dir("lm_eval")
    assert root is not None, "lm-eval is not installed: run make setup"
    for task, row in table("lmeval_tasks.yaml")["tasks"].items():
        definition = root / "tasks" / row["lm_eval_yaml"]
        assert re.search(rf"^(task|group): {task}\s*$", definition.read_text(), re.M), definition
        folder = "\n".join(p.read_text() for p in sorted(definition.parent.glob("*yaml")))  # includes, templates
        assert re.search(rf"^dataset_path: {re.escape(row['dataset'])}\s*$", folder, re.M), task
        assert re.search(rf"^(test|validation)_split: {row['split']}\s*$", folder, re.M), task
        metric, _, filter_name = row["metric"].removeprefix(f"{task}/").partition(",")
        assert re.search(rf"^\s*- metric: {re.escape(metric)}\s*$", folder, re.M), task
        if filter_name:
            assert re.search(rf'^\s*- name: "?{re.escape(filter_name)}"?\s*$', folder, re.M), task


def test_judge_table_is_the_default_and_the_paper_style_judge():
    judge = table("judge.yaml")
    assert judge["defaults"] == dataclasses.asdict(JudgeConfig())
    paper = judge["paper_style"]
    assert sorted(paper["manifests"]) == sorted(PAPER_STYLE)
    for name in PAPER_STYLE:
        resolved = dataclasses.asdict(load_manifest(ROOT / "manifests" / name).eval.judge)
        assert resolved == judge["defaults"] | {"base_url": paper["base_url"], "model": paper["model"]}, name


def test_judge_prompts_are_the_ones_the_code_sends():
    judge = table("judge.yaml")
    expected = judge["mtbench"]
    assert sorted(mtbench.NEED_REFERENCE) == expected["reference_categories"]
    assert MtBenchConfig().reference_answers == expected["reference_answers"]
    names = [expected[key] for key in ("turn1", "turn2", "turn1_with_reference", "turn2_with_reference")]
    data = mtbench.MtBenchData(
        questions=[{"question_id": 1, "category": "writing", "turns": ["a", "b"]},
                   {"question_id": 2, "category": "math", "turns": ["c", "d"]}],
        judge_prompts={name: {"system_prompt": "", "prompt_template": ""} for name in names},
        references={"2": ["r1", "r2"]}, source="test")
    answers = pa.Table.from_pylist([{"model": "m", "question_id": q, "turn": t, "text": "x"}
                                    for q in ("1", "2") for t in (1, 2)])
    sent = {(r["category"], r["turn"]): r["template"] for r in mtbench.judge_requests(data, answers)}
    assert sent == {("writing", 1): names[0], ("writing", 2): names[1], ("math", 1): names[2], ("math", 2): names[3]}
    assert winrate.TEMPLATE == judge["winrate"]["prompt"]
    assert alpacaeval.PACKAGE_ANNOTATOR == judge["alpacaeval"]["annotator"]


def test_alpacaeval_decoding_is_the_annotators_own():
    root = package_dir("alpaca_eval")
    assert root is not None, "alpaca_eval is not installed: run make setup"
    expected = table("judge.yaml")["alpacaeval"]
    configs = root / "evaluators_configs" / expected["annotator"] / "configs.yaml"
    kwargs = yaml.safe_load(configs.read_text())[expected["annotator"]]["completions_kwargs"]
    assert {key: kwargs[key] for key in ("max_tokens", "temperature", "top_logprobs")} == \
        {key: expected[key] for key in ("max_tokens", "temperature", "top_logprobs")}


def test_mtbench_temperature_table_is_the_codes():
    temperatures = table("mtbench_temperatures.yaml")
    assert temperatures["categories"] == mtbench.TEMPERATURE
    data = mtbench.MtBenchData([{"question_id": 1, "category": "not-a-category", "turns": ["q"]}], {}, {}, "test")
    assert mtbench.to_questions(data, 8)[0].temperature == temperatures["default"]


def test_mtbench_temperature_table_covers_the_installed_questions():
    questions = installed_path(*MTBENCH_DATA) / "mt_bench" / "question.jsonl"  # PackageDataMissing names the fix
    categories = {yaml.safe_load(line)["category"] for line in questions.read_text().splitlines() if line.strip()}
    assert categories == set(table("mtbench_temperatures.yaml")["categories"])


def test_data_files_load_through_the_package_loaders():
    rows = alpacaeval.load_instructions(AlpacaEvalConfig(instructions=str(INSTRUCTIONS)))
    assert len(rows) == 8 and len({r["instruction"] for r in rows}) == 8
    assert all(r["output"] is None for r in rows)  # the teacher answers them as the reference

    prompts = load_source(PromptSource(jsonl=str(WINRATE_PROMPTS)))
    assert len(prompts) == 8 and len({p.prompt_id for p in prompts}) == 8
    assert all(len(p.messages) == 1 and p.messages[0][0] == "user" for p in prompts)
    assert len(winrate.to_questions(WinRateConfig(prompts=[PromptSource(jsonl=str(WINRATE_PROMPTS))]))) == 8


def smoke_command() -> list[str]:
    """The words of the README's offline smoke command, as a shell splits them."""
    section = README.split("## Offline smoke evaluation", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_smoke_command_points_the_manifest_at_the_data_files():
    words = smoke_command()
    manifest = ROOT / words[words.index("eval") + 1]
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    suites = words[words.index("--suite") + 1].split(",")
    assert sorted(suites) == sorted(EVAL_SUITES)

    m = load_manifest(manifest, sets).eval
    assert Path(m.alpacaeval.instructions) == INSTRUCTIONS
    assert [Path(s.jsonl) for s in m.winrate.prompts] == [WINRATE_PROMPTS]
    assert len(winrate.to_questions(m.winrate)) == 8
    assert m.lmeval.data_files and set(m.lmeval.data_files) <= set(m.lmeval.tasks)
    assert all(Path(f).is_file() for files in m.lmeval.data_files.values() for f in files.values())


def test_readme_documents_every_suite_and_file():
    for suite in EVAL_SUITES:
        assert f"\n## {suite}\n" in README, suite
    for path in EVAL.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.relative_to(EVAL)}`" in README, path
