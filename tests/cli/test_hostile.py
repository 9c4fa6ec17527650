"""What a careless or hostile user does: each case is refused with one line and exit code 2 and nothing written, or
leaves a run as it was, or (a signal in the warm-up) stops with a checkpoint that --resume continues exactly."""

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS, as_set_args, start_cli_then_signal

from lowres_reft.cli import main
from lowres_reft.config import load_recipe
from lowres_reft.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.toml")
SMALL = TINY_RUN_SETS + ["log.progress=none"]


def _run(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name,words", [("x" * 300, "bytes long"), ("a\x01b", "control characters"),
                                        ("a\\b", "plain name")])
def test_bad_run_names_are_one_line_errors(tmp_path, capsys, name, words):
    code, err = _run(capsys, "run", TINY, *as_set_args(SMALL + [f"log.output_dir={tmp_path}", f"log.run_name={name}"]))
    assert code == 2 and len(err) == 1 and "[log] run_name" in err[0] and words in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_name_the_file_system_refuses_is_one_line(tmp_path, capsys):
    deep = "d" * 250  # each name fits MAX_NAME_BYTES... but the output directory's own name is what is too long here
    code, err = _run(capsys, "run", TINY, *as_set_args(SMALL + [f"log.output_dir={tmp_path / (deep + 'e' * 10)}",
                                                                  "log.run_name=r"]))
    assert code == 2 and len(err) == 1 and "File name too long" in err[0] and "[log]" in err[0], err


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_does_nothing(tmp_path, capsys):
    sets = SMALL + [f"log.output_dir={tmp_path}", "log.run_name=done", "train.steps=2"]
    assert main(["run", TINY, *as_set_args(sets)]) == 0
    capsys.readouterr()
    before = _digest(tmp_path / "done")
    assert main(["run", TINY, "--resume", *as_set_args(sets)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _digest(tmp_path / "done") == before  # metrics, eval.json, checkpoints: byte for byte
    config = json.loads((tmp_path / "done" / "checkpoint-last" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])  # the same bytes on every save


def _jsonl_recipe(tmp_path: Path, train_text: str, eval_path: bool = True) -> list[str]:
    train = tmp_path / "train.jsonl"
    train.write_text(train_text)
    sets = SMALL + ['data.name="jsonl"', f'data.path="{train}"', f"log.output_dir={tmp_path / 'runs'}"]
    if eval_path:
        (tmp_path / "test.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
        sets.append(f'data.eval_path="{tmp_path / "test.jsonl"}"')
    return sets


def test_a_file_of_blank_lines_has_no_rows(tmp_path, capsys):
    code, err = _run(capsys, "run", TINY, *as_set_args(_jsonl_recipe(tmp_path, "\n  \n\n")))
    assert code == 2 and len(err) == 1 and "train.jsonl has no rows" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path, capsys):
    text = '{"question": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": 4\n{"question": "3", "answer": "3"}\n'
    code, err = _run(capsys, "run", TINY, *as_set_args(_jsonl_recipe(tmp_path, text)))
    assert code == 2 and len(err) == 1, err  # nothing of datasets' own logging before it
    assert "train.jsonl, line 3: not valid JSON" in err[0]


def test_one_file_is_not_both_splits(tmp_path, capsys):
    sets = _jsonl_recipe(tmp_path, '{"question": "1+1", "answer": "2"}\n', eval_path=False)
    code, err = _run(capsys, "run", TINY, *as_set_args(sets))
    assert code == 2 and len(err) == 1 and "[data] eval_path" in err[0] and "training problems" in err[0], err
    from lowres_reft.data.datasets import load_problems

    recipe = load_recipe(TINY, _jsonl_recipe(tmp_path, '{"question": "1+1", "answer": "2"}\n'))
    assert [p.question for p in load_problems(recipe.data, "eval")] == ["1+1"]  # with eval_path: the eval file


def test_eval_refuses_an_unknown_split_of_builtin_data(tmp_path, capsys):
    code, err = _run(capsys, "eval", "builtin:tiny", "--data", "builtin:arithmetic", "--split", "nosuch",
                     "--out", tmp_path / "e.jsonl")
    assert code == 2 and len(err) == 1 and "--split nosuch" in err[0], err
    assert not any(tmp_path.iterdir())


def test_eval_errors_name_the_flags_typed(tmp_path, capsys):
    code, err = _run(capsys, "eval", "builtin:tiny", "--data", "jsonl", "--data-path", tmp_path / "missing.jsonl",
                     "--out", tmp_path / "e.jsonl")
    assert code == 2 and len(err) == 1 and "--data-path" in err[0] and "[data]" not in err[0], err


def test_recipe_paths_that_are_not_files(tmp_path):
    with pytest.raises(ConfigError, match="a directory, not a recipe file"):
        load_recipe(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_recipe(fifo)


def test_a_byte_order_mark_is_ignored_and_an_empty_recipe_is_said(tmp_path, capsys):
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeff[train]\nsteps = 7\n".encode("utf-8"))
    assert load_recipe(bom).train.steps == 7
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n")
    load_recipe(empty)
    assert "sets no keys: every default applies" in capsys.readouterr().err


WARMUP = ["warmup.steps=3", "warmup.skip_distill_steps=4", "warmup.batch_size=4", "log.progress=plain",
          "checkpoint.every=0", "train.steps=2"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_in_the_warm_up_checkpoints_and_resume_continues_exactly(tmp_path, capsys):
    """SIGTERM during the skip distillation: exit 143 with a checkpoint; --resume goes on from the next warm-up step
    (optimizer, teacher and skip sets restored) and ends as an uninterrupted run does."""
    sets = TINY_RUN_SETS + [f"log.output_dir={tmp_path}"] + WARMUP
    assert main(["run", TINY, *as_set_args(sets + ["log.run_name=whole"])]) == 0
    capsys.readouterr()
    proc = start_cli_then_signal(["run", TINY, *as_set_args(sets + ["log.run_name=cut"])], ROOT, "warm-up step 5/",
                                 signal.SIGTERM, timeout=300)
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143 and "stopped in the warm-up after its step" in rest and "--resume" in rest, rest
    state = json.loads((tmp_path / "cut" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 0 and 5 <= state["warmup"]["step"] < 7
    assert main(["run", TINY, "--resume", *as_set_args(sets + ["log.run_name=cut"])]) == 0
    whole, cut = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    warm = [[(r["warmup_step"], r["loss"], r["skip_distill"]) for r in recs if r["stage"] == "warmup"] for recs in (whole, cut)]
    assert warm[0] == warm[1] and [w[0] for w in warm[1]] == list(range(1, 8))  # each step once, the same values
    evals = [[(r["label"], r["eval_accuracy"]) for r in recs if r["stage"] == "eval"] for recs in (whole, cut)]
    assert evals[0] == evals[1] and [label for label, _ in evals[1]] == ["before_training", "after_warmup", "final"]
    assert [r["loss"] for r in whole if r["stage"] == "rl"] == [r["loss"] for r in cut if r["stage"] == "rl"]


def test_a_second_signal_says_aborted(tmp_path):
    """The first Ctrl-C as the warm-up starts (long steps); the second once the first is acknowledged."""
    sets = TINY_RUN_SETS + [f"log.output_dir={tmp_path}", "log.run_name=r", "log.progress=plain", "warmup.steps=50",
                            "warmup.batch_size=512", "data.builtin_train_size=512"]
    proc = start_cli_then_signal(["run", TINY, *as_set_args(sets)], ROOT, "warm-up: 50 supervised steps", signal.SIGINT,
                                 timeout=300)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("interrupt: finishing this step"):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "INT: aborted" in rest, "".join(seen) + rest
