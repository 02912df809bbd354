"""Your own prompts from YAML: ``data.name: jsonl | json | parquet | hf`` (rlclip/data/files.py).

Every file is made in ``tmp_path``; nothing touches the network (``hf`` is tested on a
directory written by ``save_to_disk`` and on a local directory of data files, both of which
``datasets`` reads offline). The ``datasets`` cache of each test goes to its ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from rlclip.config import DataConfig, load_config
from rlclip.data import SOURCES, load_records
from rlclip.errors import ConfigError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5", "topic": "add"},
    {"prompt": "What is 4 * 2?", "answer": "8", "topic": "mul"},
    {"prompt": "What is 9 - 1?", "answer": "8", "topic": "sub"},
]
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}], "gold": "2"},
    {"prompt": [{"role": "user", "content": "2 + 2?"}], "gold": "4"},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow caches of ``load_dataset`` go under the test's directory, not ~/.cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def load(**fields) -> list[dict]:
    return load_records(DataConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- the formats ----------------------------------------------------------------------------------

def test_the_new_names_are_sources():
    assert {"jsonl", "json", "parquet", "hf"} <= set(SOURCES)


def test_jsonl_text_prompts_stay_text_without_chat_and_every_column_is_kept(tmp_path):
    records = load(name="jsonl", path=write_jsonl(tmp_path / "p.jsonl", ROWS), chat=False)
    assert records == ROWS


def test_jsonl_text_prompt_becomes_a_user_message_with_chat_and_the_instruction_wraps_it(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert [r["prompt"] for r in load(name="jsonl", path=path)] == [user(r["prompt"]) for r in ROWS]
    wrapped = load(name="jsonl", path=path, chat=False, instruction="Q: {question} A: {{x}}", limit=1)
    assert wrapped == [{**ROWS[0], "prompt": "Q: What is 2 + 3? A: {x}"}]


def test_json_list_of_objects(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    assert load(name="json", path=tmp_path / "p.json", chat=False) == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    assert load(name="parquet", path=tmp_path / "p.parquet", chat=False) == ROWS


def test_chat_prompts_pass_unchanged_and_answer_field_is_renamed(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    records = load(name="jsonl", path=path, answer_field="gold", instruction="ignored for chat: {question}")
    assert records == [{"prompt": r["prompt"], "answer": r["gold"]} for r in CHAT_ROWS]
    assert load(name="jsonl", path=path, chat=False) == CHAT_ROWS  # answer_field None: columns as they are


def test_prompt_field_is_renamed_and_the_other_columns_stay(tmp_path):
    rows = [{"question": r["prompt"], "solution": r["answer"], "topic": r["topic"]} for r in ROWS]
    records = load(name="jsonl", path=write_jsonl(tmp_path / "q.jsonl", rows), prompt_field="question",
                   answer_field="solution", chat=False)
    assert records == [{"prompt": r["question"], "answer": r["solution"], "topic": r["topic"]} for r in rows]


def test_a_renamed_field_replaces_the_files_own_prompt_and_answer_columns(tmp_path):
    rows = [{**r, "question": r["prompt"].upper(), "final": r["answer"] + "!"} for r in ROWS]
    records = load(name="jsonl", path=write_jsonl(tmp_path / "q.jsonl", rows), prompt_field="question",
                   answer_field="final", chat=False)
    assert records == [{"prompt": r["question"], "answer": r["final"], "topic": r["topic"]} for r in rows]


def test_a_directory_and_a_glob_read_every_matching_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[2:])
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    assert load(name="jsonl", path=tmp_path / "d", chat=False) == ROWS
    assert load(name="jsonl", path=f"{tmp_path}/d/*.jsonl", chat=False) == ROWS


def test_hf_reads_a_saved_data_set_and_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load(name="hf", path=tmp_path / "one", chat=False) == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(
        str(tmp_path / "dict"))
    assert load(name="hf", path=tmp_path / "dict", split="test", chat=False) == ROWS[1:]
    streamed = load(name="hf", path=tmp_path / "dict", split="test", chat=False, streaming=True, limit=1)
    assert streamed == ROWS[1:2]
    with pytest.raises(ConfigError, match=r"data.split 'validation' is not in the saved data set .*choose one of "
                                          r"train, test"):
        load(name="hf", path=tmp_path / "dict", split="validation")


def test_hf_reads_a_local_directory_of_data_files_by_split(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "data" / "test.jsonl", ROWS[2:])
    assert load(name="hf", path=tmp_path / "data", split="test", chat=False) == ROWS[2:]


def test_streaming_with_a_limit_reads_only_the_first_records(tmp_path):
    # A broken line after 21 MB of good ones (the json reader streams 10 MB chunks and reads one
    # ahead): the stream stops at the limit without reaching it; loading the whole file does not.
    pad = "x" * 1000
    good = [{"prompt": f"{i} + 1 =", "answer": str(i + 1), "pad": pad} for i in range(21_000)]
    path = write_jsonl(tmp_path / "big.jsonl", [*good, "{not json"])
    assert load(name="jsonl", path=path, chat=False, streaming=True, limit=2) == good[:2]
    with pytest.raises(ConfigError, match=r"could not read data.path .*big.jsonl \(.*\); check that it is valid "
                                          r"JSON lines$"):
        load(name="jsonl", path=path, chat=False, limit=2)
    with pytest.raises(ConfigError, match=r"could not read data.path .*big.jsonl"):  # the stream fails too, read on
        load(name="jsonl", path=path, chat=False, streaming=True)


def test_num_proc_2_gives_the_same_records(tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1), "n": i} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    one = load(name="jsonl", path=path)
    assert load(name="jsonl", path=path, num_proc=2) == one
    assert one[7] == {"prompt": user("7 + 1 ="), "answer": "8", "n": 7}
    # the record index in an error is the global one, also from the second worker
    write_jsonl(path, [*rows, {"prompt": 5, "answer": "x", "n": 40}])
    with pytest.raises(ConfigError, match="record 40:"):
        load(name="jsonl", path=path, num_proc=2)


# --- errors ----------------------------------------------------------------------------------------

def error_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    """name -> (DataConfig fields, a regex the message must match)."""
    good = write_jsonl(tmp / "good.jsonl", ROWS)
    (tmp / "empty_dir").mkdir()
    (tmp / "p.csv").write_text("prompt\nhi\n")
    bad_prompt = write_jsonl(tmp / "bad.jsonl", [ROWS[0], {"prompt": {"text": "hi"}, "answer": "1", "topic": "x"}])
    empty_chat = write_jsonl(tmp / "empty_chat.jsonl", [{"prompt": []}])
    return {
        "missing file": ({"name": "jsonl", "path": tmp / "nope.jsonl"},
                         r"data.path .*nope.jsonl does not exist; pass an existing .jsonl file"),
        "directory without files": ({"name": "jsonl", "path": tmp / "empty_dir"},
                                    r"empty_dir is a directory without .jsonl files"),
        "glob without match": ({"name": "parquet", "path": f"{tmp}/*.parquet"}, r"matches no file"),
        "missing prompt field": ({"name": "jsonl", "path": good, "prompt_field": "question"},
                                 r"data.prompt_field 'question' is not a column of data.path .*good.jsonl "
                                 r"\(columns: prompt, answer, topic\); set data.prompt_field to one of them"),
        "missing answer field": ({"name": "jsonl", "path": good, "answer_field": "gold"},
                                 r"data.answer_field 'gold' is not a column .*\(columns: prompt, answer, topic\)"),
        "unsupported extension": ({"name": "jsonl", "path": tmp / "p.csv"},
                                  r"p.csv has extension .csv, but data.name jsonl reads .jsonl files; convert it"),
        "wrong name for the extension": ({"name": "parquet", "path": good},
                                         r"good.jsonl has extension .jsonl, but data.name parquet reads .parquet "
                                         r"files; set data.name jsonl"),
        "prompt neither text nor messages": ({"name": "jsonl", "path": bad_prompt},
                                             r"data.path .*bad.jsonl, record 1: data.prompt_field 'prompt' holds "
                                             r"dict \{'text': 'hi'\}; give a string or a list of \{role, content\}"),
        "empty message list": ({"name": "jsonl", "path": empty_chat}, r"record 0: .*holds list \[\]"),
        "hf without path": ({"name": "hf"}, r"data.name hf needs data.path: a saved data set directory or a hub"),
        "jsonl without path": ({"name": "jsonl"}, r"data.name jsonl needs data.path: a .jsonl file"),
        "hf missing local path": ({"name": "hf", "path": tmp / "saved"},
                                  r"data.path .*saved does not exist; pass a directory written by save_to_disk"),
        "num_proc with streaming": ({"name": "jsonl", "path": good, "streaming": True, "num_proc": 2},
                                    r"data.num_proc does not apply with data.streaming: true"),
        "num_proc zero": ({"name": "jsonl", "path": good, "num_proc": 0}, r"data.num_proc must be >= 1 or null"),
        "instruction without placeholder": ({"name": "jsonl", "path": good, "instruction": "Solve it."},
                                            r"data.instruction 'Solve it.' has no \{question\} placeholder"),
    }


def _case_names() -> list[str]:
    """The ids of ``error_cases`` (its files are written to a throw-away directory)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(error_cases(Path(tmp)))


@pytest.mark.parametrize("case", _case_names())
def test_each_error_is_one_line_naming_the_problem_and_the_fix(tmp_path, case):
    fields, pattern = error_cases(tmp_path)[case]
    with pytest.raises(ConfigError, match=pattern) as info:
        load(**fields)
    assert "\n" not in str(info.value)


# --- with the trainer and the CLI's loading --------------------------------------------------------

def test_extra_columns_reach_a_reward_function_and_a_long_prompt_is_truncated_and_counted(tmp_path):
    from rlclip import Trainer

    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1), "topic": f"t{i}"} for i in range(7)]
    rows.append({"prompt": "7 " * 2000 + "+ 1 =", "answer": "8", "topic": "long"})
    path = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    seen: dict[str, list] = {}

    def by_topic(prompts, completions, topic, answer, **kwargs):  # TRL's signature, columns as keywords
        seen.update(topic=list(topic), answer=list(answer), prompts=list(prompts))
        return [1.0 if t == "long" else 0.0 for t in topic]

    cfg = tiny_config(tmp_path / "run", "max_steps=1", "train.num_iterations=1", "rollout.prompts_per_step=8",
                      "rollout.max_prompt_length=64", "data.name=jsonl", f"data.path={path}", "data.chat=false")
    history = Trainer(cfg, reward_funcs=[by_topic]).train()
    group = cfg.rollout.group_size
    assert sorted(seen["topic"]) == sorted(r["topic"] for r in rows for _ in range(group))
    answers = {r["topic"]: r["answer"] for r in rows}
    assert [answers[t] for t in seen["topic"]] == seen["answer"]  # the columns stay aligned with each other
    assert all(isinstance(p, str) for p in seen["prompts"])
    assert history[0]["rollout/prompts_truncated"] == 1
    assert "reward/by_topic/mean" in history[0]


def test_a_recipe_with_a_jsonl_source_loads_and_passes_preflight(tmp_path):
    from rlclip.cli import preflight

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"question": r["prompt"], "gold": r["answer"]} for r in ROWS])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipes/smoke/tiny.yaml").read_text().replace(
        "  name: synthetic\n  num_examples: 200\n",
        f"  name: jsonl\n  path: {path}\n  prompt_field: question\n  answer_field: gold\n"))
    config = load_config(recipe, [f"output_dir={tmp_path / 'run'}"])
    assert (config.data.name, config.data.prompt_field, config.data.answer_field) == ("jsonl", "question", "gold")
    assert config.data.streaming is False and config.data.num_proc is None
    records = preflight(config)
    assert records == [{"prompt": user(r["prompt"]), "answer": r["answer"]} for r in ROWS]


def test_importing_the_data_package_and_config_does_not_import_datasets():
    code = "import sys, rlclip.config, rlclip.data; print('datasets' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "False"]
