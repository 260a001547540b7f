import json

import pytest

from dadpo_offline.errors import InputError
from dadpo_offline.manifest import PromptsConfig, PromptSource
from dadpo_offline.core.prompts import (benchmark_questions, builtin_prompts, collect_prompts,
                                              hub_conversation, hub_prompts, read_prompts)


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: malformed JSON"),
    (b'{"prompt": "   "}\n', r"p.jsonl:1: field 'prompt' is empty"),
    (b'{"prompt": 5}\n', r"p.jsonl:1: field 'prompt' must be a string, got int"),
    (b'{"prompt": "a", "messages": []}\n', r"p.jsonl:1: give exactly one of the fields"),
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"p.jsonl:2: invalid UTF-8 at byte"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     r"p.jsonl:1: the last message must come from the user"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', r"p.jsonl:1: messages\[0\].role 'robot'"),
    (b'{"messages": [{"role": "user", "content": ["x"]}]}\n', r"p.jsonl:1: messages\[0\].content must be a string"),
    (b'[1, 2]\n', r"p.jsonl:1: expected a JSON object, got list"),
    (b'{"prompt": "x", "split": 3}\n', r"p.jsonl:1: field 'split' must be a string"),
    (b'\n\n', r"p.jsonl: no prompts in the file"),
])
def test_read_prompts_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_prompts(path, "jsonl:p.jsonl")


def test_read_prompts_accepts_prompt_and_multi_turn(tmp_path, prompts_file):
    prompts = read_prompts(prompts_file, "jsonl:prompts.jsonl")
    assert len(prompts) == 6
    assert prompts[2].messages[-1] == ("user", "Why that one?") and len(prompts[2].messages) == 3
    assert len({p.prompt_id for p in prompts}) == 6


def test_builtin_prompt_set_has_train_and_heldout_splits():
    train, heldout = builtin_prompts("train"), builtin_prompts("heldout")
    assert len(train) >= 200 and len(heldout) >= 50
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in heldout}
    assert len({p.category for p in heldout}) == 10
    assert any(len(p.messages) > 1 for p in train)


def test_collect_prompts_deduplicates_and_drops_benchmark_overlap(tmp_path):
    heldout = builtin_prompts("heldout")[0]
    mtbench = sorted(benchmark_questions()["mt-bench"])[0]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Unique question one?"}, {"prompt": "Unique question one?"},
        {"messages": heldout.as_messages()}, {"prompt": mtbench}, {"prompt": "Another one."}]))
    kept, counts = collect_prompts(PromptsConfig(sources=[PromptSource(jsonl=str(path))]))
    assert [p.messages[-1][1] for p in kept] == ["Unique question one?", "Another one."]
    assert counts["duplicates"] == 1 and counts["overlap:builtin:heldout"] == 1 and counts["overlap:mt-bench"] == 1


def test_collect_prompts_keeps_heldout_when_asked_for_it():
    kept, counts = collect_prompts(PromptsConfig(sources=[PromptSource(builtin="heldout")], limit=5))
    assert len(kept) == 5 and all(p.split == "heldout" for p in kept)
    assert counts["over_limit"] > 0


def test_a_source_system_prompt_is_given_to_prompts_without_one(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Name a river."}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi."}]}) + "\n")
    plain, _ = collect_prompts(PromptsConfig(sources=[PromptSource(jsonl=str(path))]))
    brief, _ = collect_prompts(PromptsConfig(sources=[PromptSource(jsonl=str(path), system_prompt="Be brief.")]))
    assert brief[0].messages == (("system", "Be brief."), ("user", "Name a river."))
    assert brief[0].prompt_id != plain[0].prompt_id  # other content, so another cache entry
    assert brief[1] == plain[1]  # a prompt's own system message wins


def test_hub_rows_sharegpt_and_ultrachat_become_prompts_without_final_answer():
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                  {"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "No."}]}
    ultrachat = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    assert hub_conversation(sharegpt, "row")[-1] == {"role": "user", "content": "Tell me a joke"}
    assert hub_conversation(ultrachat, "row") == [{"role": "user", "content": "Q?"}]
    with pytest.raises(InputError, match="row: no 'messages', 'conversations' or 'prompt' field"):
        hub_conversation({"text": "x"}, "row")
    with pytest.raises(InputError, match="row: every entry of 'messages' must be an object"):
        hub_conversation({"messages": ["just a string"]}, "row")


def test_hub_source_offline_fails_with_clear_error():
    """The hub path runs up to the network call: offline it must say what failed and what to do."""
    with pytest.raises(InputError, match="hub data set HuggingFaceH4/ultrachat_200k .* could not be loaded"):
        hub_prompts(PromptSource(hub="HuggingFaceH4/ultrachat_200k", split="train_sft", limit=3))
