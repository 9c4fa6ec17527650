"""Bad input is refused before anything is written; reward functions that misbehave are named; data ambiguities."""

import json
import math
import threading
from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.cli import main
from lowres_reft.config import load_recipe
from lowres_reft.data.rewards import score
from lowres_reft.run import loop as trainer
from lowres_reft.run.checkpoint import verify_checkpoint
from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.toml")
SMALL = TINY_RUN_SETS + ["eval.before_training=false", "log.progress=none"]

# ------------------------------------------------------------------------------------------ reward functions
# Named by dotted path ("test_validation:raising_reward") in the recipes below.

_calls = {"n": 0}
_release = threading.Event()  # set at teardown so abandoned (hung) reward threads end


@pytest.fixture(autouse=True)
def _reset_calls():
    _calls["n"] = 0
    _release.clear()
    yield
    _release.set()


def raising_reward(completion: str, gold: str) -> float:
    _calls["n"] += 1
    if _calls["n"] > 8:  # the second step of a 2 x 4 rollout batch
        raise RuntimeError("reward backend unavailable")
    return 0.0


def nan_reward(completion: str, gold: str) -> float:
    return math.nan


def text_reward(completion: str, gold: str) -> str:
    return "high"


def hanging_once_reward(completion: str, gold: str) -> float:
    _calls["n"] += 1
    if _calls["n"] == 2:
        _release.wait()  # hangs until the test ends
    return 1.0


def _check(capsys, *sets) -> tuple[int, str]:
    code = main(["check", TINY, *as_set_args(list(sets))])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------- recipe values (check)

BAD_VALUES = [
    ("train.lr=inf", "[train] lr must be a finite number"),
    ("train.lr=nan", "[train] lr must be a finite number"),
    ("train.lr=5.0", "[train] lr must be in (0, 1]"),
    ("warmup.lr=inf", "[warmup] lr must be a finite number"),
    ("rollout.temperature=1e-300", "[rollout] temperature must be >= 0.001"),
    ("rollout.temperature=inf", "[rollout] temperature must be a finite number"),
    ("loss.kl_beta=inf", "[loss] kl_beta must be a finite number"),
    ("loss.advantage_eps=nan", "[loss] advantage_eps must be a finite number"),
    ("loss.is_cap=nan", "[loss] is_cap must be a finite number"),
    ("reward.format_weight=nan", "[reward] format_weight must be a finite number"),
    ("reward.timeout_s=-1", "[reward] timeout_s must be >= 0"),
    ("train.seed=9223372036854775808", "[train] seed must be in [0, 2^63)"),
    ("train.seed=-1", "[train] seed must be in [0, 2^63)"),
    ('data.path=""', "[data] path must not be empty"),
    ('reward.functions=["math_corect"]', 'unknown reward function \'math_corect\' (did you mean "math_correct"?)'),
    ('reward.functions=["no_such_module_xyz:fn"]', "cannot import module 'no_such_module_xyz'"),
]


@pytest.mark.parametrize("setting,message", BAD_VALUES)
def test_check_refuses_bad_values_in_one_line(capsys, setting, message):
    code, err = _check(capsys, setting)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_check_accepts_infinite_is_cap_and_sane_values(capsys):
    code = main(["check", TINY, *as_set_args(["loss.is_cap=inf", "rollout.temperature=0.001", "train.lr=1.0",
                                              "train.seed=9223372036854775807", "reward.timeout_s=0"])])
    out = capsys.readouterr().out
    assert code == 0 and "is_cap = inf" in out and "timeout_s = 0.0" in out


@pytest.mark.parametrize("setting", ["train.lr=inf", 'reward.functions=["math_corect"]', "rollout.temperature=1e-300",
                                     "rollout.max_new_tokens=1000000000", "eval.max_new_tokens=1000000000"])
def test_run_refuses_before_writing_anything(tmp_path, capsys, setting):
    out = tmp_path / "runs"
    code = main(["run", TINY, *as_set_args(SMALL + [f"log.output_dir={out}", "train.steps=1", setting])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (out / "tiny-cpu").exists()  # no run dir, no eval.json, no metrics


def test_max_new_tokens_beyond_context_names_key_and_limit(tmp_path, capsys):
    code = main(["run", TINY, *as_set_args(SMALL + [f"log.output_dir={tmp_path}", "rollout.max_new_tokens=1000000000"])])
    err = capsys.readouterr().err
    assert code == 2 and "[rollout] max_new_tokens = 1000000000" in err and "context length of 1024" in err


# ----------------------------------------------------------------------------------------------- eval


def test_eval_huge_max_new_tokens_is_one_line(tiny_cache, tmp_path, capsys):
    code = main(["eval", "builtin:tiny", "--cache-dir", str(tiny_cache), "--data", "builtin:arithmetic", "--n", "2",
                 "--max-new-tokens", "1000000000", "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "--max-new-tokens = 1000000000 exceeds the model's context length of" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("args,message", [(["--temperature", "1e-300"], "--temperature"),
                                          (["--seed", str(2**64)], "--seed")])
def test_eval_refuses_degenerate_sampling_settings(tmp_path, capsys, args, message):
    code = main(["eval", "builtin:tiny", "--cache-dir", str(tmp_path), "--data", "builtin:arithmetic", *args,
                 "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_on_empty_config_json_is_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code = main(["eval", str(tmp_path / "model"), "--data", "builtin:arithmetic"])
    err = capsys.readouterr().err
    assert code == 2 and "not a model directory" in err and "network" not in err


# ------------------------------------------------------------------------------------ rewards at run time


def test_score_names_a_raising_function_and_the_completion():
    _calls["n"] = 8
    with pytest.raises(UsageError) as info:
        score(["first", "second"], ["1", "1"], (f"{__name__}:raising_reward",))
    msg = str(info.value)
    assert "raising_reward" in msg and "RuntimeError: reward backend unavailable" in msg and "completion 0" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("fn,problem", [("nan_reward", "returned nan (rewards must be finite)"),
                                        ("text_reward", "returned 'high' (not a number)")])
def test_score_refuses_non_finite_or_non_numeric_rewards(fn, problem):
    with pytest.raises(UsageError) as info:
        score(["ok", "the answer is 3"], ["1", "3"], ("math_correct", f"{__name__}:{fn}"))
    assert problem in str(info.value) and "completion 0" in str(info.value) and fn in str(info.value)


def test_score_times_out_a_hanging_call_scores_it_zero_and_counts_it():
    scores = score(["a", "b", "c"], ["1", "1", "1"], (f"{__name__}:hanging_once_reward",), timeout_s=0.2)
    assert scores.rewards == [1.0, 0.0, 1.0] and scores.timeouts == 1


def _train(tmp_path, *sets):
    recipe = load_recipe(TINY, SMALL + [f"log.output_dir={tmp_path}", "log.run_name=r", *sets])
    return trainer.train(recipe, log=lambda *a: None)


def test_run_with_a_raising_reward_stops_naming_it_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(UsageError, match=r"raising_reward.*completion 0"):
        _train(tmp_path, f'reward.functions=["{__name__}:raising_reward"]', "train.steps=3", "checkpoint.every=1")
    assert verify_checkpoint(tmp_path / "r" / "checkpoint-last") is None  # step 1's checkpoint is intact
    assert json.loads((tmp_path / "r" / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 1


def test_run_with_a_hanging_reward_times_out_and_counts_it(tmp_path):
    run = _train(tmp_path, f'reward.functions=["{__name__}:hanging_once_reward"]', "reward.timeout_s=0.5",
                 "train.steps=2")
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["reward_timeouts"] for r in steps] == [1, 0]


# ------------------------------------------------------------------------------------------------ data


def _load(name, path, **kw):
    from lowres_reft.config import DataConfig
    from lowres_reft.data.datasets import load_problems

    return load_problems(DataConfig(name=name, path=str(path), **kw), "train")


@pytest.mark.parametrize("line,field,kind", [('{"question": "q", "answer": true}', "answer", "bool"),
                                              ('{"question": ["a", "b"], "answer": "1"}', "question", "list"),
                                              ('{"question": {"x": 1}, "answer": "1"}', "question", "dict")])
def test_non_text_cells_are_refused_with_row_and_field(tmp_path, line, field, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"question": "a", "answer": "1"}}\n{line}\n')
    with pytest.raises(UsageError) as info:
        _load("jsonl", path)
    assert f"row 2, field '{field}': a {kind} value" in str(info.value)


def test_bytes_cells_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a"], "answer": [b"\xff"]}), tmp_path / "d.parquet")
    with pytest.raises(UsageError, match=r"row 1, field 'answer': a bytes value"):
        _load("parquet", tmp_path / "d.parquet")


def test_folder_with_the_split_in_two_formats_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("question,answer\na,1\n")
    (tmp_path / "train.jsonl").write_text('{"question": "b", "answer": "2"}\n')
    with pytest.raises(UsageError) as info:
        _load("gsm8k", tmp_path, question_field="question", answer_field="answer")
    assert "train.csv" in str(info.value) and "train.jsonl" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_jsonl_is_one_line(tmp_path, capsys, text):
    (tmp_path / "train.jsonl").write_text(text)
    code = main(["run", TINY, *as_set_args(SMALL + [f"log.output_dir={tmp_path / 'runs'}", "data.name=jsonl",
                                                    f"data.path={tmp_path / 'train.jsonl'}"])])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
