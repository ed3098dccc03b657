"""Loading the offline benchmark copies, splits, and clear errors on bad input."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter

import pytest

from gcache.tasks import TASKS, Example, build_task
from gcache.tasks.base import read_jsonl

COUNTS = [
    ("gsm8k", {}, 1319),
    ("gpqa", {}, 198),
    ("medqa", {}, 300),
    ("medqa", {"subset": "us1273"}, 1273),
    ("humaneval", {}, 164),
    ("mbppplus", {}, 378),
    ("arith", {}, 600),
]


@pytest.mark.parametrize(("name", "kwargs", "count"), COUNTS)
def test_load_counts_and_fields(data_dir, name, kwargs, count):
    task = build_task(name, data_dir=data_dir, source="local", **kwargs)
    examples = task.load_examples()
    assert len(examples) == count
    assert len({ex.id for ex in examples}) == count
    assert all(isinstance(ex, Example) and ex.question and ex.answer for ex in examples)
    assert task.load_examples() is examples  # cached
    assert task.domain in ("math", "science", "medical", "code") and task.answer_format


def test_first_records(data_dir):
    gsm = build_task("gsm8k", data_dir=data_dir).load_examples()
    assert gsm[0].id == "gsm8k/0" and gsm[0].answer == "18" and gsm[0].question.startswith("Janet")
    answers = {ex.answer for ex in gsm}
    assert "-10" in answers and "1450000" in answers  # signs and thousands separators parsed
    he = build_task("humaneval", data_dir=data_dir).load_examples()
    assert [ex.id for ex in he[:2]] == ["HumanEval/0", "HumanEval/1"]
    mb = build_task("mbppplus", data_dir=data_dir).load_examples()
    assert mb[0].id == "Mbpp/2"


def test_build_task_unknown_name():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*allowed.*'arith'.*'gsm8k'"):
        build_task("gsm9k")
    assert set(TASKS) == {"gsm8k", "gpqa", "medqa", "humaneval", "mbppplus", "arith", "lookup"}
    assert all(cls.name == name for name, cls in TASKS.items())


def test_bad_options_are_rejected(data_dir):
    with pytest.raises(ValueError, match="source='disk'"):
        build_task("gsm8k", source="disk")
    with pytest.raises(ValueError, match="subset='us2000'"):
        build_task("medqa", subset="us2000")
    with pytest.raises(ValueError, match="min_steps"):
        build_task("arith", min_steps=3, max_steps=2)


def test_missing_directory_names_path_and_env(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    task = build_task("gsm8k", data_dir=missing, source="local")
    with pytest.raises(FileNotFoundError, match=r"nowhere/gsm8k/test\.jsonl.*GCACHE_DATA_DIR"):
        task.load_examples()
    monkeypatch.delenv("GCACHE_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="GCACHE_DATA_DIR is not set"):
        build_task("humaneval", source="local").load_examples()
    with pytest.raises(FileNotFoundError, match="medqa.json"):
        build_task("medqa", data_dir=missing).load_examples()  # MedQA has no hub fallback


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n"
    )
    monkeypatch.setenv("GCACHE_DATA_DIR", str(tmp_path))
    examples = build_task("gsm8k", source="local").load_examples()
    assert [(ex.question, ex.answer) for ex in examples] == [("1+1?", "2")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test\.jsonl: line 3 is not valid JSON"):
        build_task("gsm8k", data_dir=tmp_path, source="local").load_examples()
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(good + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: line 2 is a JSON list"):
        read_jsonl(gz)


def test_malformed_medqa_json_names_line(tmp_path):
    (tmp_path / "medqa").mkdir()
    (tmp_path / "medqa" / "medqa.json").write_text('[\n{"idx": 0,\n oops}\n]')
    with pytest.raises(ValueError, match=r"medqa\.json: line 3"):
        build_task("medqa", data_dir=tmp_path).load_examples()


def test_gsm8k_record_without_final_answer(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "q", "answer": "no marker"}) + "\n"
    )
    with pytest.raises(ValueError, match="record 0 has no '#### <number>'"):
        build_task("gsm8k", data_dir=tmp_path).load_examples()


# ---------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_disjoint_deterministic_and_cover(data_dir, name):
    task = build_task(name, data_dir=data_dir, seed=3)
    splits = task.splits()
    ids = {k: [ex.id for ex in v] for k, v in splits.items()}
    assert set(ids) == {"train", "val", "test"}
    assert all(ids.values())
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    assert sum(len(v) for v in ids.values()) == len(task.load_examples())  # train = the rest
    again = build_task(name, data_dir=data_dir, seed=3).splits()
    assert {k: [ex.id for ex in v] for k, v in again.items()} == ids
    other = build_task(name, data_dir=data_dir, seed=4).splits()
    assert [ex.id for ex in other["test"]] != ids["test"]


def test_split_sizes_counts_fractions_and_caps(data_dir):
    task = build_task("gsm8k", data_dir=data_dir, test_size=100, val_size=0.1, train_size=50)
    splits = task.splits()
    assert (len(splits["test"]), len(splits["val"]), len(splits["train"])) == (100, 132, 50)
    # test is carved out first: changing val or train size never moves a test question
    test_ids = [ex.id for ex in splits["test"]]
    for kwargs in ({"val_size": 300}, {"val_size": 0.5, "train_size": None}):
        other = build_task("gsm8k", data_dir=data_dir, test_size=100, **kwargs).splits()
        assert [ex.id for ex in other["test"]] == test_ids


def test_empty_split_is_an_error(data_dir):
    with pytest.raises(
        ValueError, match=r"task 'gpqa': split 'train' is empty.*test_size=0\.5.*val_size=99"
    ):
        build_task("gpqa", data_dir=data_dir, test_size=0.5, val_size=99).splits()
    with pytest.raises(ValueError, match="split 'val' is empty"):
        build_task("gpqa", data_dir=data_dir, val_size=0).splits()
    with pytest.raises(ValueError, match=r"test_size=1\.5 as a fraction must lie in \(0, 1\)"):
        build_task("gpqa", data_dir=data_dir, test_size=1.5).splits()
    with pytest.raises(TypeError, match="val_size must be an int count"):
        build_task("gpqa", data_dir=data_dir, val_size="10").splits()


def test_question_ids_select_the_same_questions_everywhere(data_dir):
    task = build_task("gsm8k", data_dir=data_dir, question_ids=[5, "gsm8k/17"])
    splits = task.splits()
    for split in ("train", "val", "test"):
        assert [ex.id for ex in splits[split]] == ["gsm8k/5", "gsm8k/17"]
    with pytest.raises(ValueError, match=r"question id 'gsm8k/99999' not found.*0\.\.1318"):
        build_task("gsm8k", data_dir=data_dir, question_ids=["gsm8k/99999"]).splits()
    with pytest.raises(ValueError, match="question id 5000 not found"):
        build_task("gsm8k", data_dir=data_dir, question_ids=[5000]).splits()


# ---------------------------------------------------------------------------- per-task data checks


def test_gpqa_shuffle_is_deterministic_and_uniform(data_dir):
    examples = build_task("gpqa", data_dir=data_dir, seed=0).load_examples()
    again = build_task("gpqa", data_dir=data_dir, seed=0).load_examples()
    assert [(ex.question, ex.answer) for ex in examples] == [
        (ex.question, ex.answer) for ex in again
    ]
    letters = Counter(ex.answer for ex in examples)
    assert set(letters) == set("ABCD")
    assert all(0.15 <= letters[c] / len(examples) <= 0.35 for c in "ABCD"), letters
    other = build_task("gpqa", data_dir=data_dir, seed=1).load_examples()
    assert [ex.answer for ex in other] != [ex.answer for ex in examples]
    # the order of one question does not depend on the others (seeded by its record id)
    first = examples[0]
    record = json.loads((data_dir / "gpqa" / "gpqa_diamond.jsonl").read_text().splitlines()[0])
    options = first.meta["options"]
    assert options[ord(first.answer) - ord("A")] == record["correct_answer"].strip()
    assert sorted(options) == sorted(
        [record["correct_answer"].strip()] + [a.strip() for a in record["incorrect_answers"]]
    )
    for letter, text in zip("ABCD", options, strict=True):
        assert f"\n{letter}. {text}" in first.question
    assert first.id == f"gpqa/{record['record_id']}"


def test_gpqa_hub_rows_use_the_csv_columns(data_dir, monkeypatch):
    """The hub path (not reachable here) maps the official CSV columns like the local file."""
    import csv

    from gcache.tasks import gpqa

    local = gpqa.GPQA(data_dir=data_dir, source="local").load_examples()
    with open(data_dir / "gpqa" / "gpqa_diamond.csv", newline="", encoding="utf-8") as f:
        hub_rows = list(csv.DictReader(f))
    monkeypatch.setattr(gpqa.GPQA, "_rows", lambda self, *args: hub_rows)
    from_hub = gpqa.GPQA(source="hub").load_examples()
    assert [(ex.id, ex.question, ex.answer) for ex in from_hub] == [
        (ex.id, ex.question, ex.answer) for ex in local
    ]


def test_medqa_letters(data_dir):
    examples = build_task("medqa", data_dir=data_dir).load_examples()
    item = next(ex for ex in examples if ex.meta["idx"] == 155 and "VIIa" in ex.meta["options"])
    assert item.meta["options"] == ["VII", "VIIa", "X", "XII"]
    assert item.answer == "C"
    assert "Choose the correct option" not in item.question
    assert item.question.count("\nA. ") == 1  # options listed once
    full = build_task("medqa", data_dir=data_dir, subset="us1273").load_examples()
    assert Counter(ex.answer for ex in full).keys() == set("ABCD")
    # the 300 LatentMAS questions are in the full set with the same letter
    by_question = {ex.question: ex.answer for ex in full}
    assert all(by_question.get(ex.question) == ex.answer for ex in examples)


def test_arith_deterministic_and_seeded(data_dir):
    a = build_task("arith").load_examples()
    b = build_task("arith", seed=7).load_examples()  # the split seed does not change the problems
    assert [(ex.question, ex.answer) for ex in a] == [(ex.question, ex.answer) for ex in b]
    c = build_task("arith", data_seed=1).load_examples()
    assert [ex.question for ex in a] != [ex.question for ex in c]
    assert len({ex.question for ex in a}) == len(a)
    assert {ex.meta["steps"] for ex in a} == {1, 2}
    assert all(ex.answer.isdigit() for ex in a)  # non-negative integers
    assert max(int(ex.answer) for ex in a) <= 400
    assert len({ex.meta["scenario"] for ex in a}) >= 4
    for ex in a:  # the answer is the value of the stated operations, and every operand is stated
        assert eval(ex.meta["expression"]) == int(ex.answer), ex
        for number in re.findall(r"\d+", ex.meta["expression"]):
            assert re.search(rf"\b{number}\b", ex.question), (number, ex.question)


def test_arith_difficulty_is_the_number_of_steps():
    for steps in (1, 3, 5):
        examples = build_task("arith", difficulty=steps, num_examples=50).load_examples()
        assert all(ex.meta["steps"] == len(ex.meta["ops"]) == steps for ex in examples)
    rng = random.Random(0)
    one_step = [ex for ex in build_task("arith").load_examples() if ex.meta["steps"] == 1]
    sample = rng.choice(one_step).question
    assert sample.endswith("?") and sample.count("?") == 1
