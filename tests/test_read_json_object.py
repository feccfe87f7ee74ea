"""fileio.read_json_object: config, tokenizer config and manifest files that are not a JSON object are one line."""

import pytest

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import read_json_object


def test_object_is_returned(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    assert read_json_object(tmp_path / "a.json", "fix it") == {"x": [1, 2]}


@pytest.mark.parametrize("text, said", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object"),
                                        (b"\xff\xfe", "is not valid JSON")])
def test_bad_files_are_one_line_ending_with_the_fix(tmp_path, text, said):
    path = tmp_path / "a.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(MobileLLMError) as err:
        read_json_object(path, "re-run the tool")
    msg = str(err.value)
    assert said in msg and msg.endswith("; re-run the tool") and "\n" not in msg and str(path) in msg


def test_missing_file_is_left_to_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "none.json", "x")
