"""The main job's inputs: character tokenizer, task files, batches, bad input."""

import pytest

from fishercheck.inputs import CharTokenizer, check_batch, load_model, make_batch, read_texts


def test_make_batch_pads_right_and_masks_labels():
    tok = CharTokenizer(["<pad>", "\n", "a", "b"])
    batch = make_batch(tok, ["ab", "a"], "t", max_length=10)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1], [1, 2, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 1], [1, 2, 1, -100]]
    assert batch["sample_ids"] == ["t_0", "t_1"]


def test_read_texts_skips_blank_lines_and_reads_jsonl_fields(tmp_path):
    (tmp_path / "a.txt").write_text("x\n\ny\nz\n")
    (tmp_path / "b.jsonl").write_text('{"t": "p"}\n{"t": "q"}\n')
    assert read_texts(tmp_path / "a.txt", limit=2) == ["x", "y"]
    assert read_texts(tmp_path / "b.jsonl", text_field="t") == ["p", "q"]


def test_embedded_default_is_a_trained_gpt2():
    inp = load_model(None)
    assert inp.trained and inp.model.config.model_type == "gpt2"
    assert sum(p.numel() for p in inp.model.parameters()) < 100_000
    assert not inp.model.training and isinstance(inp.tokenizer, CharTokenizer)


def _jsonl_without_field(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    return read_texts(tmp_path / "c.jsonl")


def _empty_file(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n")
    return read_texts(tmp_path / "e.txt")


def _file(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return read_texts(path)


class _Silent:
    """A tokenizer that encodes every text to no token at all."""

    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": []}


BAD_INPUT = [
    pytest.param(lambda tmp: _file(tmp, "t.json", '["a b", "c"]'),
                 r"expected a \.txt .* or \.jsonl .* got the suffix '\.json'", id="json-suffix"),
    pytest.param(lambda tmp: _file(tmp, "t.jsonl", '{"text": "a"}\n"str"\n'),
                 r"t\.jsonl:2: expected a JSON object, got str", id="jsonl-not-object"),
    pytest.param(lambda tmp: _file(tmp, "t.jsonl", '{"text": "a"}\n{oops\n'),
                 r"t\.jsonl:2: expected a JSON object, got invalid JSON", id="jsonl-invalid"),
    pytest.param(lambda tmp: _file(tmp, "t.jsonl", '{"text": null}\n'),
                 r"t\.jsonl:1: expected the field 'text' to be a string, got NoneType", id="jsonl-null"),
    pytest.param(lambda tmp: _file(tmp, "t.txt", b"ok\n\xff\xfe bad\n"), r"t\.txt.*expected UTF-8 text",
                 id="not-utf8"),
    pytest.param(lambda tmp: make_batch(CharTokenizer(["<pad>", "\n", "a"]), ["a", "ab"], "a", 8,
                                        source="t.txt"),
                 r"task file 't\.txt', text 2: text: expected characters", id="char-names-the-file"),
    pytest.param(lambda tmp: read_texts(tmp / "missing.txt"), "expected an existing .txt or .jsonl",
                 id="missing-file"),
    pytest.param(_jsonl_without_field, "expected a field 'text'", id="jsonl-field"),
    pytest.param(_empty_file, "expected at least one text", id="empty-file"),
    pytest.param(lambda tmp: _file(tmp, "t.jsonl", '{"text": ""}\n{"text": " "}\n'),
                 r"t\.jsonl: expected at least one text, got none \(2 records with an empty 'text'\)",
                 id="jsonl-all-empty"),
    pytest.param(lambda tmp: check_batch(make_batch(_Silent(), ["x", "y"], "a", 8), None, "t.txt"),
                 r"task file 't\.txt': expected at least one text of two or more tokens .*got 2 "
                 r"text\(s\) of at most one token", id="texts-of-no-token"),
    pytest.param(lambda tmp: CharTokenizer(["<pad>", "\n", "a"]).encode("ab"),
                 r"expected characters from the model's vocabulary, got \['b'\]", id="unknown-char"),
    pytest.param(lambda tmp: load_model(str(tmp / "nope")), "expected a local checkpoint directory",
                 id="no-checkpoint"),
]


@pytest.mark.parametrize("call, message", BAD_INPUT)
def test_bad_input_raises_value_error(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_jsonl_suffix_is_case_insensitive(tmp_path):
    (tmp_path / "T.JSONL").write_text('{"text": "a b"}\n')
    assert read_texts(tmp_path / "T.JSONL") == ["a b"]


def test_jsonl_records_with_empty_texts_are_skipped(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": ""}\n{"text": "b"}\n')
    assert read_texts(tmp_path / "t.jsonl") == ["a", "b"]
