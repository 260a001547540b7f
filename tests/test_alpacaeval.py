"""AlpacaEval through the real alpaca_eval package, judged by the real vLLM judge server (SmolLM2)."""
import dataclasses
import json
import shutil
import time
import urllib.request

import pytest

from dadpo_offline.eval.serve import free_port
from conftest import write_jsonl
from dadpo_offline.errors import InputError, JudgeError
from dadpo_offline.eval.alpacaeval import load_instructions, run_alpacaeval
from dadpo_offline.manifest import AlpacaEvalConfig, JudgeConfig

INSTRUCTIONS = ["Explain in one sentence why the sky looks blue.", "List two uses for a paperclip.",
                "Translate 'good morning' into French."]
TEACHER = ["Air molecules scatter short blue wavelengths of sunlight far more than red ones, so blue light reaches "
           "our eyes from every direction.", "1. Holding loose sheets of paper together.\n2. Resetting a small "
           "device through its pinhole button.", "Bonjour."]
STUDENT = ["Because it is.", "Paper.", "Good morning is hello."]
TRAINED = ["Sunlight is scattered by the air, and blue light is scattered the most.", "Clip papers; open a SIM tray.",
           "Bonjour."]  # the last answer equals the teacher's: a draw without a judge call
SECRET = "sk-dadpo-test-never-on-disk"


def answers(texts):
    return [{"instruction": i, "output": t} for i, t in zip(INSTRUCTIONS, texts)]


def judge_config(base_url):
    return JudgeConfig(base_url=base_url, model="smol-judge", concurrency=2, max_retries=1, timeout_s=60)


def judge_requests(base_url: str) -> float:
    """Requests the judge server finished, from its Prometheus metrics."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def judged(judge_server, tmp_path_factory):
    """One real AlpacaEval run: two models against the teacher's answers on our own three instructions."""
    out_dir = tmp_path_factory.mktemp("alpacaeval")
    config = AlpacaEvalConfig(instructions=str(write_jsonl(out_dir / "mine.jsonl", answers(TEACHER))))
    judge = dataclasses.replace(judge_config(judge_server["base_url"]), api_key_env="DADPO_TEST_JUDGE_KEY")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DADPO_TEST_JUDGE_KEY", SECRET)  # the vLLM judge accepts any key
        rows = run_alpacaeval(config, judge, {"student": answers(STUDENT), "trained": answers(TRAINED)},
                              answers(TEACHER), "teacher", out_dir)
    return {"out_dir": out_dir, "rows": rows, "config": config, "judge": judge}


def test_run_alpacaeval_rows(judged, judge_server):
    rows = {(r["model"], r["metric"]): r for r in judged["rows"]}
    for model in ("student", "trained"):
        assert {m for (name, m) in rows if name == model} == {"win_rate", "n_wins", "n_draws", "avg_length",
                                                              "unparsed_judgments"}
        win = rows[(model, "win_rate")]
        assert 0 <= win["value"] <= 100
        assert win["judge"] == f"smol-judge@{judge_server['base_url']}"
        assert win["n"] + rows[(model, "unparsed_judgments")]["value"] == 3
        assert rows[(model, "unparsed_judgments")]["n"] == 3
    assert rows[("trained", "n_draws")]["value"] >= 1  # the identical answer
    assert rows[("student", "avg_length")]["value"] == len("".join(STUDENT)) // 3  # characters, as alpaca_eval counts


def test_run_alpacaeval_saves_leaderboard_annotations_and_config(judged, judge_server):
    base = judged["out_dir"] / "alpacaeval"
    leaderboard = (base / "leaderboard.csv").read_text()
    assert "win_rate" in leaderboard and "student" in leaderboard and "trained" in leaderboard
    for model in ("student", "trained"):
        annotations = json.loads((base / model / "annotations.json").read_text())
        assert [a["instruction"] for a in annotations] == INSTRUCTIONS
        assert {a["generator_2"] for a in annotations} == {model} and {a["generator_1"] for a in annotations} == {"teacher"}
        assert all("smol-judge@" + judge_server["base_url"] in a["annotator"] for a in annotations)
    config = (base / "annotator" / "configs.yaml").read_text()
    assert judge_server["base_url"] in config and "model_name: smol-judge" in config
    assert "api_key" not in config
    assert not [p for p in judged["out_dir"].rglob("*") if p.is_file() and SECRET in p.read_text(errors="replace")]
    assert len(json.loads((base / "annotator" / "annotations_seed0_configs.json").read_text())) == 6


def test_run_alpacaeval_rerun_reuses_cached_judgments(judged, judge_server):
    before = judge_requests(judge_server["base_url"])
    rows = run_alpacaeval(judged["config"], judged["judge"], {"student": answers(STUDENT), "trained": answers(TRAINED)},
                          answers(TEACHER), "teacher", judged["out_dir"])
    assert judge_requests(judge_server["base_url"]) == before
    same = lambda r: (r["model"], r["metric"], pytest.approx(r["value"]), r["n"], r["judge"])  # cache JSON rounds floats
    assert [same(r) for r in rows] == [same(r) for r in judged["rows"]]


def test_run_alpacaeval_official_set_offline_reports_plain_win_rate(judged, tmp_path, capsys):
    """Length control needs a hub file; offline it is left out, said on stderr, and nothing crashes."""
    shutil.copytree(judged["out_dir"] / "alpacaeval" / "annotator", tmp_path / "alpacaeval" / "annotator")  # no new calls
    rows = run_alpacaeval(AlpacaEvalConfig(), judged["judge"], {"student": answers(STUDENT)}, answers(TEACHER),
                          "teacher", tmp_path)
    assert "length_controlled_winrate" not in {r["metric"] for r in rows}
    assert "no length-controlled win rate" in capsys.readouterr().err


def test_run_alpacaeval_unreachable_judge_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(JudgeError, match=f"{url}.*unreachable"):
        run_alpacaeval(AlpacaEvalConfig(), judge_config(url), {"student": answers(STUDENT)}, answers(TEACHER),
                       "teacher", tmp_path)
    assert time.monotonic() - start < 60


def test_run_alpacaeval_rejects_misaligned_outputs(tmp_path):
    judge = judge_config("http://127.0.0.1:1/v1")  # never contacted: inputs are checked first
    with pytest.raises(InputError, match="student has 2 outputs, the reference 3"):
        run_alpacaeval(AlpacaEvalConfig(), judge, {"student": answers(STUDENT)[:2]}, answers(TEACHER), "teacher", tmp_path)
    with pytest.raises(InputError, match="student output 0 answers .*instruction order"):
        run_alpacaeval(AlpacaEvalConfig(), judge, {"student": answers(STUDENT)[::-1]}, answers(TEACHER), "teacher",
                       tmp_path)


def test_rows_count_unparsed_judgments(capsys):
    """A judgment without "m"/"M" in the top logprobs comes back as preference None: counted, and left out of n."""
    import pandas as pd
    from alpaca_eval.metrics import get_winrate

    from dadpo_offline.eval.alpacaeval import _rows

    annotations = [{"preference": 1.8}, {"preference": None}, {"preference": 1.5}]
    rows = {r["metric"]: r for r in _rows("student", pd.Series({**get_winrate(annotations), "avg_length": 10}),
                                          annotations, "judge@url")}
    assert rows["win_rate"]["value"] == pytest.approx(65.0) and rows["win_rate"]["n"] == 2  # (0.8 + 0.5) / 2
    assert (rows["unparsed_judgments"]["value"], rows["unparsed_judgments"]["n"]) == (1, 3)
    assert "student: 1 of 3 judgments could not be parsed" in capsys.readouterr().err


def test_load_instructions_reads_file_and_applies_limit(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": INSTRUCTIONS[0], "output": TEACHER[0], "dataset": "x"},
                                                 {"instruction": INSTRUCTIONS[1]}, {"instruction": INSTRUCTIONS[2]}])
    assert load_instructions(AlpacaEvalConfig(instructions=str(path), limit=2)) == [
        {"instruction": INSTRUCTIONS[0], "output": TEACHER[0], "dataset": "x"},
        {"instruction": INSTRUCTIONS[1], "output": None, "dataset": "mine"}]


def test_load_instructions_errors_name_file_and_line(tmp_path):
    with pytest.raises(InputError, match=r"missing.jsonl: instructions file \(eval.alpacaeval.instructions\) not found"):
        load_instructions(AlpacaEvalConfig(instructions=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi."}\n\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:3: malformed JSON"):
        load_instructions(AlpacaEvalConfig(instructions=str(bad)))
    bad.write_text('{"instruction": "Say hi."}\n{"prompt": "Say hi."}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected \{\"instruction\""):
        load_instructions(AlpacaEvalConfig(instructions=str(bad)))
    bad.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "Say bye."}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: no `output`.*reference=teacher"):
        load_instructions(AlpacaEvalConfig(instructions=str(bad), reference="file"))


def test_load_instructions_official_set_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(InputError, match="set eval.alpacaeval.instructions"):
        load_instructions(AlpacaEvalConfig())
