"""The stdlib corpus splits stably by path hash; text and JSONL sources read exactly the
documents in their files and name the file on bad input."""
import hashlib
import json
import os
import sysconfig

import pytest

from t5x_lite.data import corpora


def documents(source, split, shuffle=False, seed=None):
    dataset = source.get_dataset(split, shuffle=shuffle, seed=seed)
    return [example["text"].decode("utf-8") for example in dataset.as_numpy_iterator()]


def test_stdlib_split_is_disjoint_complete_and_about_two_percent():
    train, validation = corpora.stdlib_files("train"), corpora.stdlib_files("validation")
    assert train == sorted(train) and validation == sorted(validation)
    assert not set(train) & set(validation)
    assert 0.01 <= len(validation) / (len(train) + len(validation)) <= 0.03
    root = sysconfig.get_paths()["stdlib"]
    for path in train + validation:
        relative = os.path.relpath(path, root)
        parts = relative.split(os.sep)
        assert os.path.isabs(path) and path.endswith(".py")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), relative
    assert os.path.join(root, "os.py") in train + validation
    assert len(train) + len(validation) > 500


def test_stdlib_split_follows_the_sha256_of_the_relative_path():
    root = sysconfig.get_paths()["stdlib"]
    for split in ("train", "validation"):
        for path in corpora.stdlib_files(split):
            digest = hashlib.sha256(os.path.relpath(path, root).encode()).digest()
            in_validation = int.from_bytes(digest[:8], "big") < 0.02 * 2**64
            assert in_validation == (split == "validation"), path


def test_stdlib_unknown_split_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown split 'test': allowed values are train, "
                                         "validation"):
        corpora.stdlib_files("test")


def test_stdlib_source_reads_each_file_once_and_shuffles_by_seed():
    paths = corpora.stdlib_files("validation")
    expected = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            expected.append(f.read())
    source = corpora.stdlib_source()
    assert documents(source, "validation") == expected
    shuffled = documents(source, "validation", shuffle=True, seed=1)
    assert shuffled == documents(source, "validation", shuffle=True, seed=1)
    assert shuffled != expected and sorted(shuffled) == sorted(expected)


def test_text_and_jsonl_files_give_one_document_per_line(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("first line\n\n   \nsecond line\nthird\n")
    jsonl_file = tmp_path / "b.jsonl"
    jsonl_file.write_text("\n".join(json.dumps({"text": t, "id": i})
                                    for i, t in enumerate(["x = 1\n", "def f():\n  pass"])))
    validation_file = tmp_path / "c.jsonl"
    validation_file.write_text(json.dumps({"body": "held out"}) + "\n\n")
    source = corpora.text_files_source([str(text_file), str(jsonl_file)])
    assert source.splits == ("train",)
    assert documents(source, "train") == [
        "first line", "second line", "third", "x = 1\n", "def f():\n  pass"]
    held_out = corpora.text_files_source(str(text_file), str(validation_file), text_field="body")
    assert held_out.splits == ("train", "validation")
    assert documents(held_out, "train") == ["first line", "second line", "third"]
    assert documents(held_out, "validation") == ["held out"]


def test_shuffling_orders_files_and_jsonl_documents_by_seed(tmp_path):
    jsonl_file = tmp_path / "many.jsonl"
    jsonl_file.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    text_file = tmp_path / "lines.txt"
    text_file.write_text("line 1\nline 2\nline 3\n")
    source = corpora.text_files_source([str(jsonl_file), str(text_file)])
    in_order = documents(source, "train")
    shuffled = documents(source, "train", shuffle=True, seed=4)
    assert shuffled == documents(source, "train", shuffle=True, seed=4)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    jsonl_part = [d for d in shuffled if d.startswith("doc")]
    assert jsonl_part != [f"doc {i}" for i in range(40)]  # Documents move within the file.
    assert [d for d in shuffled if d.startswith("line")] == ["line 1", "line 2", "line 3"]
    assert documents(source, "train", shuffle=True, seed=5) != shuffled


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=f"^text file {missing} does not exist$"):
        corpora.text_files_source([str(missing)])


def test_jsonl_line_without_the_field_names_file_line_and_field(tmp_path):
    jsonl_file = tmp_path / "d.jsonl"
    jsonl_file.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=f"^{jsonl_file}:2: JSON line has no field 'text'$"):
        corpora.text_files_source([str(jsonl_file)])
