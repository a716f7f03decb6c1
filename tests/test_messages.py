"""Every file hf_dograph reads fails with one line: the file, the line where it applies, what is wrong and the
fix. The command line prints that line, no traceback, and exits 2."""

from __future__ import annotations

import json
import re

import pytest

from hf_dograph.cli import main
from hf_dograph.data import DataError, DataSpec, build_domain_dataset, load_tokenizer

LOCAL = ["--set", "data.source=local", "--set", "data.label_field=src"]


def cli_error(argv, capsys) -> str:
    """Run the command; it must exit 2 with exactly one line on stderr and no traceback. Returns that line."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hf-dograph: error: ") and "Fix:" in err, err
    return err


def write_jsonl(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def good(i: int) -> bytes:
    return json.dumps({"text": f"document {i} " * 8, "src": "ab"[i % 2]}).encode()


# ----------------------------------------------------------------------------- data files
def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [good(0), good(1), b"", good(2), b'{"text": "cut sho', good(4)])  # line 5 is broken
    err = cli_error(["train", "tiny", "--smoke", *LOCAL, "--set", f"data.path={path}",
                     "--output-dir", str(tmp_path / "out")], capsys)
    assert f"{path}, line 5, column " in err and "not valid JSON" in err and "correct or delete that line" in err

    # the library raises the same, as a DataError
    spec = DataSpec(source="local", path=str(path), label_field="src", seq_len=16)
    with pytest.raises(DataError, match=rf"{path}, line 5"):
        build_domain_dataset(spec, load_tokenizer("bytes"))


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [good(0), b"[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}, line 2: this line is a JSON list, not an object"):
        build_domain_dataset(DataSpec(source="local", path=str(path), label_field="src", seq_len=16),
                             load_tokenizer("bytes"))


def test_non_utf8_bytes_name_file_line_and_offset(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    lines = [good(0), good(1), '{"text": "caf\u00e9 cr\u00e8me", "src": "a"}'.encode("latin-1")]
    write_jsonl(path, lines)
    offset = len(lines[0]) + 1 + len(lines[1]) + 1 + lines[2].index(b"\xe9")
    err = cli_error(["train", "tiny", "--smoke", *LOCAL, "--set", f"data.path={path}",
                     "--output-dir", str(tmp_path / "out")], capsys)
    assert f"{path}, line 3 (byte offset {offset}): not UTF-8 text (byte 0xe9)" in err and "iconv" in err

    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(b"text,src\nhello,a\n\xff\xfe,b\n")
    with pytest.raises(DataError, match=rf"{csv_path}, line 3 \(byte offset 17\): not UTF-8"):
        build_domain_dataset(DataSpec(source="local", path=str(csv_path), label_field="src", seq_len=16),
                             load_tokenizer("bytes"))


def test_garbled_json_list_file_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a", "src": "x"},\n  {"text": "b" "src": "y"}\n]\n')
    with pytest.raises(DataError, match=rf"{path}, line 3, column 16: not valid JSON"):
        build_domain_dataset(DataSpec(source="local", path=str(path), label_field="src", seq_len=16),
                             load_tokenizer("bytes"))


# ----------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished smoke run with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("messages") / "run"
    assert main(["train", "tiny", "--smoke", "--output-dir", str(out), "--set", "training.save_strategy=steps",
                 "--set", "training.save_steps=1"]) == 0
    return out


def test_truncated_dograph_state_on_resume(checkpointed_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    capsys.readouterr()
    state = out / "checkpoint-2" / "dograph_state.json"
    state.write_text(state.read_text()[:100])  # a disk that filled up mid-write
    err = cli_error(["train", "tiny", "--smoke", "--output-dir", str(out), "--set", "training.max_steps=3",
                     "--resume-from-checkpoint", str(out / "checkpoint-2")], capsys)
    assert re.search(rf"{re.escape(str(state))}, line 1, column \d+: the DoGraph state ends before its JSON does", err)
    assert "resume from another checkpoint-N" in err and f"delete {state}" in err

    state.write_bytes(b'{"format": "hf_dograph.dograph_state", \x00\xff garbage}')  # garbled, not cut
    err = cli_error(["train", "tiny", "--smoke", "--output-dir", str(out), "--set", "training.max_steps=3",
                     "--resume-from-checkpoint", str(out / "checkpoint-2")], capsys)
    assert f"{state}, line 1 (byte offset 40): the DoGraph state is not UTF-8 text" in err

    trainer_state = out / "checkpoint-1" / "trainer_state.json"
    trainer_state.write_text("{")
    err = cli_error(["train", "tiny", "--smoke", "--output-dir", str(out), "--set", "training.max_steps=3",
                     "--resume-from-checkpoint", str(out / "checkpoint-1")], capsys)
    assert "checkpoint-1: an incomplete checkpoint (trainer_state.json is truncated or not valid JSON)" in err


def test_resume_from_a_mistyped_path_is_not_a_hub_lookup(checkpointed_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for typo, hint in (("some/typo", "if you mean the Hub repo, write hf://some/typo"),
                       ("outputs/chekpoint-5", "a Hub repo is written hf://"),
                       ("./run/checkpoint-2", "a Hub repo is written hf://")):
        err = cli_error(["train", "tiny", "--smoke", "--output-dir", str(tmp_path / "new"),
                         "--resume-from-checkpoint", typo], capsys)
        assert f"{typo}: no such file or folder ({tmp_path / typo.lstrip('./')})" in err, err
        assert hint in err and "Offline" not in err, err
    # the run folder itself is no checkpoint: say which one to name
    err = cli_error(["train", "tiny", "--smoke", "--output-dir", str(checkpointed_run), "--resume-from-checkpoint",
                     str(checkpointed_run)], capsys)
    assert "not a Trainer checkpoint (no trainer_state.json)" in err and "checkpoint-2 (the last complete one)" in err


def test_hub_reference_rule():
    from hf_dograph.hub import HubRef, HubReferenceError, locate

    assert locate("hf://me/model@v1:last-checkpoint", bare_hub_ids=False) == ("hub", HubRef("me/model", "v1",
                                                                                             "last-checkpoint"))
    assert locate("me/model") == ("hub", HubRef("me/model"))  # the Python API keeps bare ids
    with pytest.raises(HubReferenceError, match="write hf://me/model"):
        locate("me/model", bare_hub_ids=False)
    for local_looking in ("./x/y", "/abs/x", "~/x", "a/b/c", "me/checkpoint-3", "last-checkpoint", "x\\y"):
        with pytest.raises(HubReferenceError, match="no such file or folder"):
            locate(local_looking)


# ----------------------------------------------------------------------------- hf-dograph eval
def test_eval_on_a_folder_without_a_model(checkpointed_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(["eval", str(empty)], capsys)
    assert f"{empty}: this folder holds no model (no config.json or adapter_config.json)" in err
    assert "outputs/tiny" in err

    # a run folder whose final model is missing (killed before the end) points to its last checkpoint
    import shutil

    run = tmp_path / "killed"
    shutil.copytree(checkpointed_run, run)
    (run / "config.json").unlink()
    err = cli_error(["eval", str(run)], capsys)
    assert f"evaluate its last complete checkpoint: {run / 'checkpoint-2'}" in err

    err = cli_error(["eval", "someone/model"], capsys)
    assert "write hf://someone/model" in err


def test_garbled_domain_names_file_is_named_and_does_not_stop_a_run(tmp_path, caplog):
    from hf_dograph.plots import domain_names_from

    (tmp_path / "domain_names.json").write_text('["prose", "code",')
    with caplog.at_level("WARNING"):
        assert domain_names_from(tmp_path) is None  # read at the end of a run, for the plots: a warning, not a crash
    assert re.search(r"domain_names.json, line 1, column 18: the list of domain names ends before its JSON does.*"
                     r"Fix: rewrite it", caplog.text)


def test_garbled_recipe_names_its_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel:\n  config: {model_type: gpt2\ntraining:\n  max_steps: 2\n")
    err = cli_error(["train", str(path)], capsys)
    assert f"recipe {path}, line 4, column 9: not valid YAML" in err
    path.write_bytes(b"name: caf\xe9\n")
    err = cli_error(["show", str(path)], capsys)
    assert f"recipe {path}, line 1 (byte offset 9): not UTF-8 text (byte 0xe9)" in err


def test_push_of_a_missing_or_model_less_folder(tmp_path, capsys):
    err = cli_error(["push", str(tmp_path / "nope"), "--repo-id", "me/x"], capsys)
    assert f"{tmp_path / 'nope'}: no such folder" in err
    err = cli_error(["push", str(tmp_path), "--repo-id", "me/x"], capsys)
    assert "this folder holds no model" in err
