"""Never lose or mix a run: run-dir lock, resume rules, SIGTERM, checksums before export/eval, TOML escaping,
metrics on a full disk, leftovers of killed saves."""

import dataclasses
import json
import os
import shutil
import signal
import typing
from pathlib import Path

import pytest
import tomllib
from conftest import TINY_RUN_SETS, as_set_args, start_cli_then_signal

from lowres_reft.cli import main
from lowres_reft.config import Recipe, load_recipe, sections
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.run import checkpoint as run_checkpoint
from lowres_reft.run import loop as trainer
from lowres_reft.run import metrics as metrics_mod
from lowres_reft.run.metrics import MetricsLog, read_metrics
from lowres_reft.run.rundir import RunLock
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.toml")
PROMPT = "Solve.\r\tSay \"x\"\x01\x7f\\n"  # control characters, a quote, a backslash
SMALL = TINY_RUN_SETS + ["eval.before_training=false", "log.progress=plain", "checkpoint.every=1",
                         "data.system_prompt=" + json.dumps(PROMPT)]


def _sets(out, name, *extra):
    return as_set_args(SMALL + [f"log.output_dir={out}", f"log.run_name={name}", *extra])


def _main(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rl_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """runs/ holding "base": 2 steps, a checkpoint after each, a system prompt full of control characters."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", TINY, *_sets(out, "base", "train.steps=2")]) == 0
    return out


def _copy(done_run, tmp_path) -> Path:
    out = tmp_path / "runs"
    shutil.copytree(done_run, out, symlinks=True)
    return out


def test_second_run_into_a_live_run_dir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "runs"
    run = out / "shared"
    first = start_cli_then_signal(["run", TINY, *_sets(out, "shared", "train.steps=1000")], ROOT, "step 2/", 0, timeout=300)
    try:
        code, stdout, err = _main(capsys, "run", TINY, *_sets(out, "shared", "train.steps=1000", "train.seed=1"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert f"in use by process {first.pid}" in err
        code, _, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "shared", "train.steps=1000"))
        assert code == 2 and str(first.pid) in err
        assert (run / ".lock").read_text().startswith(f"{first.pid} ")  # the refused runs wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    steps = _rl_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one run's steps only: no 1,1,2,2
    (run / ".tmp-checkpoint-000099-4242").mkdir()  # what killed saves leave behind
    (run / ".checkpoint-last.4242").symlink_to("checkpoint-000001")
    done = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"]
    code, stdout, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "shared", f"train.steps={done + 1}"))
    assert code == 0, err[-2000:]
    assert f"left by process {first.pid}" in stdout  # the stale lock of the killed run was taken over
    assert not list(run.glob(".tmp-checkpoint-*")) and not list(run.glob(".checkpoint-last.*"))
    assert _rl_steps(run) == list(range(1, done + 2))
    assert (run / ".lock").read_text() == ""  # released on exit


def test_lock_file_with_a_dead_pid_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999 on elsewhere\n")
    messages = []
    with RunLock(run, messages.append):
        assert (run / ".lock").read_text().startswith(f"{os.getpid()} ")
        with pytest.raises(UsageError, match=f"in use by process {os.getpid()} "):
            RunLock(run, messages.append)
    assert "999999999" in messages[0]
    assert (run / ".lock").read_text() == ""


def test_resume_refuses_a_changed_recipe_and_records_what_it_uses(done_run, tmp_path, capsys):
    out = _copy(done_run, tmp_path)
    run = out / "base"
    before = _files(run)
    changed = ["train.lr=0.1", "lora.r=8", "rollout.group_size=8", "behavior.skip_ratio=0.5"]
    code, stdout, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "base", "train.steps=3", *changed))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for text in ("train.lr: 0.0005 -> 0.1", "lora.r: 4 -> 8", "rollout.group_size: 4 -> 8", "behavior.skip_ratio: 0.25 -> 0.5"):
        assert text in err, err
    code, _, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "base", "train.steps=1"))
    assert code == 2 and "before the checkpoint's step 2" in err
    assert _files(run) == before  # nothing written by the refused resumes
    with pytest.raises(UsageError, match="written by 1 process"):  # another world size: refused in one line
        run_checkpoint.check_resume(load_recipe(TINY, SMALL + [f"log.output_dir={out}", "log.run_name=base"]),
                             run / "checkpoint-last", world=2)

    code, _, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "base", "train.steps=3", "checkpoint.keep_last=5"))
    assert code == 0, err[-2000:]
    saved = tomllib.loads((run / "checkpoint-last" / "recipe.toml").read_text())
    assert saved["train"]["steps"] == 3 and saved["checkpoint"]["keep_last"] == 5 and saved["train"]["lr"] == 0.0005
    assert saved["data"]["system_prompt"] == PROMPT
    assert _rl_steps(run) == [1, 2, 3]


def test_sigterm_checkpoints_exits_143_and_resume_keeps_metrics(tmp_path, capsys):
    out = tmp_path / "runs"
    run = out / "term"
    proc = start_cli_then_signal(["run", TINY, *_sets(out, "term", "train.steps=1000", "checkpoint.every=0")], ROOT,
                                 "step 2/", signal.SIGTERM, timeout=300)
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143 and "--resume" in rest
    step = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert 2 <= step < 1000 and [json.loads(x)["step"] for x in lines if '"rl"' in x] == list(range(1, step + 1))
    code, _, err = _main(capsys, "run", "--resume", TINY, *_sets(out, "term", f"train.steps={step + 1}", "checkpoint.every=0"))
    assert code == 0, err[-2000:]
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[: len(lines)] == lines  # the lines up to the checkpoint are kept as they were
    assert _rl_steps(run) == list(range(1, step + 2))


def test_export_and_eval_refuse_a_corrupted_checkpoint(done_run, tmp_path, capsys):
    out = _copy(done_run, tmp_path)
    ckpt = out / "base" / "checkpoint-last"
    good = tmp_path / "good-adapter"
    code, _, err = _main(capsys, "export", ckpt, "--adapter", good)  # the control-character recipe loads back
    assert code == 0, err
    weights = ckpt / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    for args in (["export", ckpt, "--adapter", tmp_path / "a"], ["eval", ckpt, "--out", tmp_path / "e.jsonl"]):
        code, _, err = _main(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "adapter_model.safetensors is corrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good-adapter", "runs"]


def _string_keys() -> list[tuple[str, str, typing.Any]]:
    """(section, key, type) of every recipe key holding free text (str, str | None, tuple[str, ...])."""
    out = []
    hints = typing.get_type_hints(Recipe)
    for section in sections():
        for key, tp in typing.get_type_hints(hints[section]).items():
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            # a union such as `tuple[str, ...] | Literal["all-linear"]` holds free text through its tuple member
            listed = next((a for a in args if typing.get_origin(a) is tuple), None)
            if tp is str or args == [str] or (typing.get_origin(tp) is tuple and args[:1] == [str]):
                out.append((section, key, tp))
            elif listed is not None and typing.get_args(listed)[:1] == (str,):
                out.append((section, key, listed))
    return out


def test_toml_writer_round_trips_every_control_character_in_every_string_key():
    text = "a" + "".join(chr(c) for c in [*range(0x20), 0x7F]) + '"\\\'b\u00e9'
    keys = _string_keys()
    assert ("data", "system_prompt", str) in keys and any(k == "target_modules" for _, k, _ in keys)
    recipe = Recipe()
    for section, key, tp in keys:
        value = (text,) if typing.get_origin(tp) is tuple else text
        recipe = dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **{key: value})})
    assert tomllib.loads(recipe_to_toml(recipe)) == recipe.to_dict()


def test_disk_full_while_writing_metrics_stops_with_a_checkpoint(tmp_path, monkeypatch):
    sets = SMALL + [f"log.output_dir={tmp_path}", "log.run_name=full", "log.progress=none"]
    real_write, calls = metrics_mod._write, {"n": 0}

    def full_at_second_step(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the disk fills halfway through step 2's line
            os.write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(metrics_mod, "_write", full_at_second_step)
    with pytest.raises(UsageError, match="No space left on device.*stopped at step 2.*--resume") as err:
        trainer.train(load_recipe(TINY, sets + ["train.steps=5"]), log=lambda *a: None)
    assert "\n" not in str(err.value)
    run = tmp_path / "full"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]  # no torn line
    assert json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(metrics_mod, "_write", real_write)
    trainer.train(load_recipe(TINY, sets + ["train.steps=3"]), resume=True, log=lambda *a: None)
    assert _rl_steps(run) == [1, 2, 3]  # step 2's line, kept in the checkpoint, was written on resume


def test_restarting_from_step_0_moves_old_metrics_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    (tmp_path / "metrics.jsonl.old-1").write_text("older\n")
    MetricsLog(path).write({"step": 1, "x": 2})
    assert (tmp_path / "metrics.jsonl.old-2").read_text() == '{"step": 1}\n'
    assert read_metrics(path) == [{"step": 1, "x": 2}]
