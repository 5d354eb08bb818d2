"""What sft.py, reward.py, dpo.py, kto.py, orpo.py and cpo.py share, checked in all of them: a data file without a
'test' split trains without evaluation unless a test split was named; dpo/kto/orpo/cpo's --max_prompt_length follows
--max_length unless it is set. The fast checks run each script's __main__ in process up to a failure that comes after
what is checked (no model is loaded); the end-to-end runs are marked slow."""

import json

import pytest
from conftest import ASSETS, REPO, assert_each_fails_with_one_line, read_metrics, run_main_in_process, run_ok

SCRIPTS = ["sft.py", "reward.py", "dpo.py", "kto.py", "orpo.py", "cpo.py"]
PREFERENCE_SCRIPTS = ["dpo.py", "kto.py", "orpo.py", "cpo.py"]


def write_rows(path, script: str, n: int):
    """The first n train rows of the tiny world in a format the script reads (kto.py reads preference pairs too)."""
    source = ASSETS / "data" / ("sft_messages" if script == "sft.py" else "preference") / "train.jsonl"
    path.write_text("".join(line + "\n" for line in source.read_text().splitlines()[:n]))
    return path


def run_until_it_fails(monkeypatch, script: str, *args):
    """run_main_in_process, also returning the script's Args as its __main__ left them (defaults resolved)."""
    import tyro

    parsed, parse = [], tyro.cli
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: parsed.append(parse(*a, **kw)) or parsed[-1])
    line = run_main_in_process(monkeypatch, script, *args)
    return parsed[0], line


def note(data) -> str:
    return f"dataset {data} has no split 'test': training without evaluation (pass --dataset_test_split to name one)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_single_data_file_goes_on_without_evaluation_and_says_so_once(monkeypatch, capsys, tmp_path, script):
    data = write_rows(tmp_path / "train_only.jsonl", script, 2)
    # a batch larger than the data stops the run at the step-size check, after the splits and the tokenisation
    args, line = run_until_it_fails(monkeypatch, script, "--dataset_name", data, "--per_device_train_batch_size", 64,
                                    "--output_dir", tmp_path / "out")
    assert "the training set has" in line and "one optimizer step needs 64" in line, line
    assert capsys.readouterr().out.count(note(data)) == 1
    assert args.dataset_test_split is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_test_split_the_data_has_is_used_and_a_named_missing_split_is_one_line(monkeypatch, capsys, tmp_path,
                                                                                 script):
    (tmp_path / "splits").mkdir()
    write_rows(tmp_path / "splits" / "train.jsonl", script, 2)
    write_rows(tmp_path / "splits" / "test.jsonl", script, 2)
    args, _ = run_until_it_fails(monkeypatch, script, "--dataset_name", tmp_path / "splits",
                                 "--per_device_train_batch_size", 64, "--output_dir", tmp_path / "out")
    assert args.dataset_test_split == "test" and "training without evaluation" not in capsys.readouterr().out
    data = write_rows(tmp_path / "train_only.jsonl", script, 2)
    args, _ = run_until_it_fails(monkeypatch, script, "--dataset_name", data, "--dataset_test_split", "None",
                                 "--per_device_train_batch_size", 64, "--output_dir", tmp_path / "out")
    assert args.dataset_test_split is None and "training without evaluation" not in capsys.readouterr().out
    assert_each_fails_with_one_line(monkeypatch, script, [
        (["--dataset_name", data, "--dataset_test_split", split],
         f"dataset {data} has no split '{split}'; found splits ['train'] (--dataset_test_split None trains without "
         "evaluation)")
        for split in ["test", "validation"]  # named, even as 'test': it must exist
    ], tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft.py", "dpo.py"])
def test_a_single_data_file_trains_end_to_end_without_evaluation(tmp_path, script):
    data = write_rows(tmp_path / "train_only.jsonl", script, 16)
    result = run_ok(script, "--dataset_name", data, "--max_steps", 2, "--logging_steps", 1,
                    "--output_dir", tmp_path / "out")
    assert result.stdout.count(note(data)) == 1, result.stdout
    assert " train / 0 eval " in result.stdout
    metrics = read_metrics(tmp_path / "out")
    assert [row["step"] for row in metrics if "loss" in row] == [1, 2]
    assert not [key for row in metrics for key in row if key.startswith("eval")]
    assert json.loads((tmp_path / "out" / "args.json").read_text())["dataset_test_split"] is None
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("script", PREFERENCE_SCRIPTS)
def test_max_prompt_length_follows_max_length_unless_set(monkeypatch, tmp_path, script):
    missing = tmp_path / "missing.jsonl"  # the run stops at loading the data, after the lengths are checked
    for flags, expected in [([], 128), (["--max_length", 128], 64), (["--max_length", 1024], 128),
                            (["--max_length", 128, "--max_prompt_length", 100], 100)]:
        args, line = run_until_it_fails(monkeypatch, script, *flags, "--dataset_name", missing,
                                        "--output_dir", tmp_path / "out")
        assert f"could not load dataset {missing}" in line, (flags, line)
        assert args.max_prompt_length == expected, flags
    assert_each_fails_with_one_line(monkeypatch, script, [
        (["--max_length", 128, "--max_prompt_length", 128],
         "--max_prompt_length must be positive and below --max_length 128 so that answers keep some tokens, got 128"),
    ], tmp_path / "out")


def test_the_max_prompt_length_block_is_the_same_in_every_preference_script():
    def block(script: str, start: str, end: str) -> str:
        text = (REPO / script).read_text()
        return text[text.index(start) : text.index(end, text.index(start))]

    length_blocks = {block(script, "    if args.max_prompt_length is None:", "    if args.beta")
                     for script in PREFERENCE_SCRIPTS}
    assert len(length_blocks) == 1
