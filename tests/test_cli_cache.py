"""`cache status` / `cache verify` over eval's files: real caches, exact output."""
import json

from click.testing import CliRunner

from dadpo_offline.cache import open_cache
from dadpo_offline.cache.artefacts import cached_json, register_files, store_json
from dadpo_offline.cache.shards import fingerprint
from dadpo_offline.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cache_status_and_verify_cover_eval_files(tmp_path):
    """lm-eval results and alpaca_eval's annotator folder are registered files: listed, checked, recomputed."""
    cache = open_cache(tmp_path / "cache", create=True)
    settings = {"suite": "lmeval", "model": "m", "tasks": {"arc_challenge": 0}}
    result = cache.root / "lmeval" / f"{fingerprint(settings)}.json"
    assert cached_json(cache, "lmeval", settings, result) is None  # nothing yet: compute it
    data = {"results": {"arc_challenge": {"acc,none": 0.5}}}
    assert store_json(cache, "lmeval", settings, result, data) == data
    assert cached_json(cache, "lmeval", settings, result) == data  # a rerun reads it back
    annotator = cache.root / "alpacaeval" / "annotator"
    annotator.mkdir(parents=True)
    (annotator / "configs.yaml").write_text("annotator: {}\n")
    judgments = annotator / "annotations_seed0_configs.json"
    judgments.write_text(json.dumps([{"preference": 1.0}, {"preference": 2.0}]))
    from dadpo_offline.eval.alpacaeval import register_annotator

    register_annotator(cache, annotator)

    rows = {r["stage"]: r for r in json.loads(invoke("cache", "status", cache.root, "-f", "json").output)}
    assert (rows["lmeval"]["fingerprint"], rows["lmeval"]["done"], rows["lmeval"]["n_shards"]) == (fingerprint(settings), 1, 1)
    assert rows["lmeval"]["bytes"] == result.stat().st_size
    assert (rows["alpacaeval"]["done"], rows["alpacaeval"]["rows"]) == (2, 3)  # the config, and 2 judgments
    assert invoke("cache", "verify", cache.root).output.strip() == "all shards intact"

    data_bytes = bytearray(result.read_bytes())
    data_bytes[-3] ^= 0x01
    result.write_bytes(bytes(data_bytes))
    judgments.write_text("[{\"preference\": 1.0}")  # cut short
    verify = invoke("cache", "verify", cache.root)
    assert verify.exit_code == 1
    assert verify.output.splitlines()[:2] == [
        f"alpacaeval file (alpacaeval/annotator/annotations_seed0_configs.json): size {judgments.stat().st_size} bytes, registered "
        f"{len(json.dumps([{'preference': 1.0}, {'preference': 2.0}]))} (truncated or overwritten)",
        f"lmeval file (lmeval/{result.name}): checksum mismatch (corrupted)"]
    assert verify.output.splitlines()[2].startswith("Error: 2 bad shard(s)")
    assert cached_json(cache, "lmeval", settings, result) is None  # damaged: removed, to be computed again
    assert not result.exists() and fingerprint(settings) not in {
        r["fingerprint"] for r in cache.status() if r["done"]}


def test_an_unregistered_lmeval_result_of_an_older_cache_is_adopted(tmp_path):
    cache = open_cache(tmp_path / "cache", create=True)
    settings = {"suite": "lmeval", "model": "old"}
    path = cache.root / "lmeval" / f"{fingerprint(settings)}.json"
    path.parent.mkdir()
    path.write_text('{"results": {}}')
    assert cached_json(cache, "lmeval", settings, path) == {"results": {}}
    assert [(r["stage"], r["done"]) for r in cache.status()] == [("lmeval", 1)]
    assert cache.verify() == []
    register_files(cache, "lmeval", settings, [path])  # registering again replaces, never duplicates
    assert len(cache.registered("lmeval", fingerprint(settings))) == 1
