"""Several teachers (`teachers:`): the manifest, unchanged single-teacher fingerprints, and a real
two-teacher run — precompute, SQL, cache status, step-0 check and daDPO steps — on tiny models.

The loss itself is checked against its closed forms in tests/test_losses.py."""
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import PROMPTS, SMOLLM2, write_jsonl
from dadpo_offline.cli import main
from dadpo_offline.errors import ManifestError
from dadpo_offline.manifest import load_manifest

TWO = """\
teachers:
  - {name: smol, model: embedded:smollm2-135m-instruct, beta2: 0.02}
  - {name: tiny, model: TINY, beta2: 0.05}
"""


def manifest_file(tmp_path, text: str):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_teachers_load_with_names_weights_and_the_chosen_teacher(tmp_path):
    m = load_manifest(manifest_file(tmp_path, TWO.replace("TINY", "./tiny") + "pairs: {chosen_from: tiny}\n"))
    assert [(t.name, t.beta2) for t in m.teachers] == [("smol", 0.02), ("tiny", 0.05)]
    assert m.teachers[1].model == str((tmp_path / "tiny").resolve())  # ./ resolves against the manifest, as teacher: does
    assert m.chosen_teacher is m.teachers[1] and m.teacher_betas() == (0.02, 0.05)
    first = load_manifest(manifest_file(tmp_path, TWO.replace("TINY", "./tiny")))
    assert first.chosen_teacher is first.teachers[0]
    single = load_manifest(None)
    assert single.chosen_teacher is single.teacher and single.teacher_betas() == single.train.beta2


@pytest.mark.parametrize("text, message", [
    ("teacher: {model: x}\n" + TWO, "teacher and teachers: give one"),
    (TWO + "train: {beta2: 0.1}\n", "train.beta2: with teachers, each teacher's own beta2"),
    (TWO.replace("name: tiny", "name: smol"), "teachers: the name 'smol' is given twice"),
    (TWO.replace("name: tiny", "name: Tiny Model"), "teachers[1].name: 'Tiny Model' must be lowercase"),
    (TWO.replace("name: tiny", "name: reference"), "teachers[1].name: 'reference'"),
    (TWO.replace("beta2: 0.05", "beta2: -1"), "teachers[1].beta2 must be >= 0, got -1.0"),
    (TWO + "pairs: {chosen_from: big}\n", "pairs.chosen_from: 'big' is not each or a teacher's name (smol, tiny)"),
    ("pairs: {chosen_from: each}\n", "pairs.chosen_from=each: applies with teachers: only"),
    (TWO + "sweep: {beta2: [0.1]}\n", "sweep.beta2: with teachers"),
    (TWO.replace("0.02", "0").replace("0.05", "0") + "train: {loss: rdpo, compare: []}\n",
     "train.loss=rdpo needs a positive beta2"),
])
def test_bad_teachers_settings_are_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest_file(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_single_teacher_manifest_keeps_the_fingerprints_it_had_before_teachers(tmp_path, monkeypatch, smollm2_dir):
    """Every stage's fingerprint for a plain `teacher:` manifest, pinned to the values the code before
    `teachers:` (commit 00c5354) gave, so existing caches stay valid. Fakes, named: build_stage records
    each stage's fingerprint instead of building (no model runs), and the engine identity leaves out
    library versions and device, which differ between machines. The tokenizer's rendering still counts."""
    import dadpo_offline.precompute.run as run
    from dadpo_offline.cache.build import BuiltStage, StageReport

    seen = {}

    def record_only(cache, stage, fingerprint, *args, **kwargs):
        seen[stage] = fingerprint
        return BuiltStage(StageReport(stage, fingerprint), None)

    monkeypatch.setattr(run, "build_stage", record_only)
    monkeypatch.setattr(run, "engine_identity", lambda backend, dtype, config: {"backend": backend, "dtype": dtype})
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is the capital of France?"}\n'
                                            '{"prompt": "Name three primary colours."}\n')
    run.precompute(load_manifest(manifest_file(tmp_path, "cache_dir: cache\nprompts: {sources: [{jsonl: prompts.jsonl}]}\n"
                                               "engine: {backend: transformers, shard_size: 1}\n")))
    assert seen == {"prompts": "bf1b65e121499661", "generate-student": "d4236dff7e589ef9",
                    "generate-teacher": "d4236dff7e589ef9", "score-teacher": "5d54e20eab6e3629",
                    "score-reference": "5d54e20eab6e3629", "pairs": "19c8c82a0494c151"}


def two_teacher_cache(base, tiny_student, tiny_other_model, chosen_from: str):
    """A real two-teacher cache: the embedded SmolLM2 (the student's tokenizer) and the tiny model with its
    own tokenizer; transformers engine in fp32; 3 prompts, 1 sample, 6 tokens. Returns (manifest, summary)."""
    from dadpo_offline.precompute.run import precompute

    write_jsonl(base / "prompts.jsonl", PROMPTS[:3])
    path = manifest_file(base, TWO.replace("TINY", str(tiny_other_model)) + f"""\
student: {{model: {tiny_student}}}
cache_dir: cache
prompts: {{sources: [{{jsonl: prompts.jsonl}}], max_prompt_tokens: 256}}
generate: {{teacher: {{max_tokens: 6, temperature: 1.0}}, student: {{max_tokens: 6, temperature: 1.0}}}}
engine: {{backend: transformers, shard_size: 2}}
pairs: {{require_finished: none, chosen_from: {chosen_from}}}
train: {{report_to: [], warmup_ratio: 0, lr_scheduler: constant, learning_rate: 0.001, batch_size: 3,
         micro_batch_size: 3, max_steps: 2, output_dir: train, compare: []}}
""")
    return path, precompute(load_manifest(path))


@pytest.fixture(scope="module")
def two_teacher_run(tmp_path_factory, tiny_student, tiny_other_model):
    """The tiny model, with its own tokenizer, writes the chosen answers."""
    return two_teacher_cache(tmp_path_factory.mktemp("two_teachers"), tiny_student, tiny_other_model, "tiny")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_two_teachers_each_score_both_answers_in_their_own_stage(two_teacher_run):
    path, summary = two_teacher_run
    m = load_manifest(path)
    built = {r.stage: r for r in summary.stages}
    assert {"score-teacher-smol", "score-teacher-tiny", "score-reference"} <= set(built)
    assert "score-teacher" not in built
    rows = json.loads(invoke("sql", m.cache_dir, "SELECT scorer, role, count(*) AS n FROM scores "
                             "GROUP BY ALL ORDER BY ALL", "-f", "json").output)
    assert rows == [{"scorer": s, "role": r, "n": 3} for s in ("reference", "smol", "tiny") for r in ("student", "teacher")]
    pairs = json.loads(invoke("sql", m.cache_dir, "SELECT teachers, teachers_chosen_logp, teacher_chosen_logp "
                              "FROM pairs ORDER BY prompt_id", "-f", "json").output)
    assert len(pairs) == 3 and all(p["teachers"] == ["smol", "tiny"] for p in pairs)
    assert all(p["teachers_chosen_logp"][1] == p["teacher_chosen_logp"] for p in pairs)  # tiny wrote the chosen answers
    assert all(p["teachers_chosen_logp"][0] != p["teachers_chosen_logp"][1] for p in pairs)
    # each teacher read the same answers with its own tokenizer and chat template: other token ids
    ids = json.loads(invoke("sql", m.cache_dir, "SELECT prompt_id, role, list(input_ids ORDER BY scorer) AS ids FROM scores "
                            "WHERE scorer IN ('smol', 'tiny') GROUP BY ALL", "-f", "json").output)
    assert len(ids) == 6 and all(row["ids"][0] != row["ids"][1] for row in ids)
    status = {r["stage"]: r for r in json.loads(invoke("cache", "status", m.cache_dir, "-f", "json").output)}
    assert status["score-teacher-tiny"]["done"] == status["score-teacher-smol"]["done"] == 2
    assert "tiny" in status["score-teacher-tiny"]["note"]


def test_a_rerun_skips_every_finished_teacher_stage(two_teacher_run):
    from dadpo_offline.precompute.run import precompute

    path, first = two_teacher_run
    again = precompute(load_manifest(path))
    assert [(r.stage, r.built, r.fingerprint) for r in again.stages] == \
        [(r.stage, 0, r.fingerprint) for r in first.stages]


def test_two_teacher_dadpo_trains_after_a_passing_step0_check(two_teacher_run):
    """Step 1 runs with policy = reference (ref margin 0), so its loss follows from the cache alone:
    mean over pairs of −log σ(Σ_i β2_i·[(ref_w − te_i,w) − (ref_l − te_i,l)])."""
    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.train.dpo import train_dadpo

    path, _ = two_teacher_run
    m = load_manifest(path)
    result = train_dadpo(m, quiet=True)
    assert result["steps"] == 2 and result["step0"]["anchor_max"] == 0.0 and result["step0"]["token_mean"] < 1e-4
    first = result["history"][0]
    with open_cache(m.cache_dir).connect() as con:
        expected = con.execute(
            "SELECT avg(ln(1 + exp(-(0.02 * ((ref_chosen_logp - teachers_chosen_logp[1]) - (ref_rejected_logp - "
            "teachers_rejected_logp[1])) + 0.05 * ((ref_chosen_logp - teachers_chosen_logp[2]) - (ref_rejected_logp - "
            "teachers_rejected_logp[2])))))) FROM pairs").fetchone()[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["teacher_term"] == pytest.approx(0.02 * first["teacher_margin/smol"] + 0.05 * first["teacher_margin/tiny"],
                                                  rel=1e-6)
    card = (load_manifest(path).train.output_dir + "/dadpo/README.md")
    assert "beta2={smol: 0.02, tiny: 0.05}" in open(card, encoding="utf-8").read()
    record = json.loads(open(load_manifest(path).train.output_dir + "/dadpo/run.json", encoding="utf-8").read())
    assert record["teachers"] == {"smol": 0.02, "tiny": 0.05} and "beta2" not in record
    assert yaml.safe_load(open(load_manifest(path).train.output_dir + "/dadpo/manifest.yaml"))["teachers"][1]["name"] == "tiny"


def test_a_resolved_two_teacher_manifest_loads_back_the_same(tmp_path):
    from dadpo_offline.manifest import write_resolved

    m = load_manifest(manifest_file(tmp_path, TWO.replace("TINY", "org/tiny") + "pairs: {chosen_from: tiny}\n"))
    write_resolved(m, tmp_path / "resolved.yaml")
    assert load_manifest(tmp_path / "resolved.yaml") == m


def test_run_dry_run_plans_one_score_stage_per_teacher_with_its_weight(tmp_path):
    from dadpo_offline.plan import plan

    m = load_manifest(manifest_file(tmp_path, TWO.replace("TINY", SMOLLM2) + "pairs: {chosen_from: tiny}\n"
                                    "prompts: {sources: [{builtin: train}], limit: 4}\neval: {suites: [likelihood]}\n"))
    stages = {s["stage"]: s for s in plan(m)["stages"]}
    assert stages["score-teacher-smol"]["model"] == "teacher smol" and "β2=0.02" in stages["score-teacher-smol"]["what"]
    assert "β2=0.05" in stages["score-teacher-tiny"]["what"] and "score-teacher" not in stages
    assert "β1=0.1, β2=(0.02, 0.05)" in stages["train-dadpo"]["what"]


def test_the_report_names_each_teacher_with_its_beta2_and_margin(two_teacher_run):
    """Runs after the training test (same module, file order): the report reads its run.json and the cache."""
    from dadpo_offline.core.layout import RunLayout
    from dadpo_offline.report import write_report

    path, _ = two_teacher_run
    m = load_manifest(path)
    if not (RunLayout.of(m).stage("dadpo") / "run.json").is_file():
        pytest.fail("run test_two_teacher_dadpo_trains_after_a_passing_step0_check first (it trains the run reported)")
    report = (Path(write_report(RunLayout.of(m))["files"][0])).read_text(encoding="utf-8")
    assert '| dadpo | 0.1 | {"smol": 0.02, "tiny": 0.05} |' in report
    assert "δ_te by teacher (teachers:; δ_te above: pairs.chosen_from's): smol mean" in report and "tiny mean" in report


def test_chosen_from_each_takes_the_teachers_in_turn_and_each_scores_its_own_answers_exactly(
        tmp_path, tiny_student, tiny_other_model):
    """Prompts 0 and 2 (prompts-stage order) get SmolLM2's answers, prompt 1 the tiny model's. A teacher scoring
    its own answer reuses the sampled ids; the other one re-reads the text with its own tokenizer."""
    from dadpo_offline.core.chat import load_chat_format
    from dadpo_offline.core.models import resolve_model
    from dadpo_offline.train.data import load_sft_examples

    path, _ = two_teacher_cache(tmp_path, tiny_student, tiny_other_model, "each")
    m = load_manifest(path)
    order = json.loads(invoke("sql", m.cache_dir, "SELECT settings FROM stages WHERE stage = 'prompts' AND active",
                              "-f", "json").output)[0]["settings"]
    writers = dict(zip([p[0] for p in json.loads(order)["prompts"]], ["smol", "tiny", "smol"]))
    rows = json.loads(invoke("sql", m.cache_dir, """
        SELECT g.prompt_id, s.scorer, s.input_ids = list_concat(g.prompt_token_ids, g.response_token_ids) AS own_ids
        FROM generations g JOIN scores s USING (prompt_id, sample, role)
        WHERE g.role = 'teacher' AND s.scorer IN ('smol', 'tiny')""", "-f", "json").output)
    assert len(rows) == 6
    assert all(r["own_ids"] == (r["scorer"] == writers[r["prompt_id"]]) for r in rows)
    assert json.loads(invoke("sql", m.cache_dir, "SELECT count(*) AS n FROM pairs", "-f", "json").output) == [{"n": 3}]
    assert len(load_sft_examples(m.cache_dir, load_chat_format(resolve_model(str(tiny_student))))) == 3


def test_a_sweep_refuses_several_teachers_in_one_line(tmp_path):
    from dadpo_offline.sweep.run import grid

    with pytest.raises(ManifestError, match="^sweep: a manifest with teachers: .* cannot be swept yet — train each"):
        grid(load_manifest(manifest_file(tmp_path, TWO.replace("TINY", "org/tiny"))))


def test_the_report_reads_pairs_built_before_the_teachers_columns(tmp_path):
    """Old caches keep their pairs shards (same fingerprints); without the columns the report has no per-teacher line."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dadpo_offline.report import teacher_margins

    pq.write_table(pa.table({"teacher_chosen_logp": [-3.0], "teacher_rejected_logp": [-9.0]}), tmp_path / "old.parquet")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW pairs AS SELECT * FROM read_parquet(['{tmp_path / 'old.parquet'}'], union_by_name = true)")
    assert teacher_margins(con) == []
    pq.write_table(pa.table({"teachers": [["a", "b"]], "teachers_chosen_logp": [[-3.0, -4.0]],
                             "teachers_rejected_logp": [[-9.0, -5.0]]}), tmp_path / "new.parquet")
    con.execute(f"CREATE OR REPLACE VIEW pairs AS SELECT * FROM read_parquet(['{tmp_path / 'new.parquet'}'])")
    assert teacher_margins(con) == [("a", 6.0), ("b", 1.0)]
