"""Integration: the real CLI on the builtin tiny model: run, resume, Ctrl-C, export, bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS, as_set_args, start_cli_then_signal
from safetensors.torch import load_file

from lowres_reft.cli import main
from lowres_reft.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.toml")
SMALL = TINY_RUN_SETS + ["log.progress=plain"]


def _cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lowres_reft", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _adapter(ckpt: Path) -> dict:
    return load_file(ckpt / "adapter" / "adapter_model.safetensors")


def _run_inproc(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_resume_equals_uninterrupted_and_export(tmp_path, capsys):
    out = str(tmp_path / "runs")
    common = SMALL + [f"log.output_dir={out}", "checkpoint.every=2"]
    code, stdout, err = _run_inproc(capsys, "run", TINY, *as_set_args(common + ["log.run_name=straight", "train.steps=4"]))
    assert code == 0, err[-2000:]
    assert "trainable" in stdout and "step 4/4" in stdout
    code, _, err = _run_inproc(capsys, "run", TINY, *as_set_args(common + ["log.run_name=split", "train.steps=2"]))
    assert code == 0, err[-2000:]
    # The same command again without --resume refuses to clobber the run.
    code, _, err = _run_inproc(capsys, "run", TINY, *as_set_args(common + ["log.run_name=split", "train.steps=2"]))
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = _run_inproc(capsys, "run", TINY, "--resume", *as_set_args(common + ["log.run_name=split", "train.steps=4"]))
    assert code == 0, err[-2000:]
    assert "resumed from" in stdout

    run = Path(out) / "split"
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no duplicated or missing steps
    ref = [r for r in read_metrics(Path(out) / "straight" / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["skip_set"] for r in records] == [r["skip_set"] for r in ref]
    assert [r["reward_mean"] for r in records] == [r["reward_mean"] for r in ref]
    a, b = _adapter(run / "checkpoint-last"), _adapter(Path(out) / "straight" / "checkpoint-last")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for key in ("reward_mean", "rollout_tokens_per_s", "skip_set", "rho_mean", "rho_min", "rho_max", "is_truncated_frac",
                "ess", "trace_mean", "loss", "grad_norm", "lr", "peak_mem_mb", "step_seconds", "truncated_frac"):
        assert key in records[0], key
    assert (run / "report.png").stat().st_size > 5000 and "report:" in stdout
    evals = json.loads((run / "eval.json").read_text())["history"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 4
    state = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 4

    merged = tmp_path / "merged"
    exp = _cli("export", str(run / "checkpoint-last"), "--merged", str(merged), "--dtype", "float32")
    assert exp.returncode == 0, exp.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.config.num_hidden_layers == 4 and tok("1+1")["input_ids"]


def test_ctrl_c_saves_checkpoint_and_resume_continues(tmp_path):
    out = str(tmp_path / "runs")
    args = ["run", TINY, *as_set_args(SMALL + [f"log.output_dir={out}", "log.run_name=intr", "train.steps=50", "checkpoint.every=0"])]
    proc = start_cli_then_signal(args, ROOT, "step 1/", signal.SIGINT, timeout=240, stderr=subprocess.PIPE)
    rest, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in rest
    run = Path(out) / "intr"
    step = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 50
    done = _cli("run", "--resume", TINY, *as_set_args(SMALL + [f"log.output_dir={out}", "log.run_name=intr", f"train.steps={step + 1}"]))
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert steps == list(range(1, step + 2))


BAD_RECIPES = [
    ("missing.toml", None, "not found"),
    ("syntax.toml", "[train]\nsteps = = 3\n", "line 2"),
    ("section.toml", "[trian]\nsteps = 3\n", 'did you mean "train"'),
    ("key.toml", "[train]\nstesp = 3\n", 'did you mean "steps"'),
    ("type.toml", "[train]\nsteps = \"many\"\n", "must be an integer"),
    ("zero.toml", "[train]\nsteps = 0\n", "steps must be >= 1"),
    ("negative.toml", "[rollout]\nmax_new_tokens = -5\n", "max_new_tokens"),
    ("ratio.toml", "[behavior]\nskip_ratio = 1.0\n", "skip_ratio must be in [0, 1)"),
    ("group.toml", "[rollout]\ngroup_size = 1\n", "group_size must be >= 2"),
    ("protect.toml", "[model]\nname = \"builtin:tiny\"\ntiny_layers = 4\n[behavior]\nprotect_first = 2\nprotect_last = 2\n", "protect_first + protect_last"),
    ("toomany.toml", "[model]\nname = \"builtin:tiny\"\ntiny_layers = 4\ntiny_hidden = 64\ndevice = \"cpu\"\ndtype = \"float32\"\n[data]\nname = \"builtin:arithmetic\"\nbuiltin_train_size = 8\nbuiltin_test_size = 4\n[behavior]\nskip_ratio = 0.9\n", "only 2 are skippable"),
    ("choice.toml", "[loss]\ncorrection = \"vtrace\"\n", "one of"),
    ("modelpath.toml", "[model]\nname = \"./no/such/model\"\n", "does not exist"),
    ("nodata.toml", "[model]\nname = \"builtin:tiny\"\ntiny_layers = 4\ntiny_hidden = 64\ndevice = \"cpu\"\ndtype = \"float32\"\n[data]\nname = \"jsonl\"\npath = \"/no/such/file.jsonl\"\n", "path"),
]


@pytest.mark.parametrize("name,text,expected", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_clear_error_exit_2(tmp_path, capsys, monkeypatch, name, text, expected):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / name
    if text is not None:
        recipe.write_text(text + f'\n[log]\noutput_dir = "{tmp_path / "runs"}"\n' if "[log]" not in text else text)
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert not (tmp_path / "runs" / recipe.stem).exists()  # nothing written, not even the run directory


def test_cli_subprocess_bad_recipe_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1e-3\n")
    result = _cli("run", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'error: {bad}: unknown key [train] learning_rate (known: ' + result.stderr.split("(known: ")[1].strip()]
    assert "Traceback" not in result.stderr


def test_export_without_checkpoint_is_clear(tmp_path, capsys):
    code = main(["export", str(tmp_path / "runs" / "nothing" / "checkpoint-last"), "--merged", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_lora_targets_matching_no_module_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "runs"
    sets = SMALL + [f"log.output_dir={out}", "log.run_name=badlora", "lora.target_modules=['q_proj','qkv_proj']"]
    code, _, err = _run_inproc(capsys, "run", TINY, *as_set_args(sets))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "['qkv_proj'] match no module of Qwen2ForCausalLM" in err and "all-linear" in err
    assert not (out / "badlora").exists()


def test_every_recipe_validates():
    from lowres_reft.config import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


@pytest.mark.parametrize("name,model", [("qwen3-1.7b-gsm8k", "Qwen/Qwen3-1.7B"),
                                        ("llama-3.2-3b-gsm8k", "meta-llama/Llama-3.2-3B-Instruct"),
                                        ("gemma-2-2b-gsm8k", "google/gemma-2-2b-it")])
def test_single_gpu_recipes_parse(name, model):
    from lowres_reft.config import load_recipe

    path = ROOT / "recipes" / f"{name}.toml"
    recipe = load_recipe(path)
    assert recipe.model.name == model and recipe.model.load_in_4bit and recipe.lora.target_modules == "all-linear"
    assert "estimated" in path.read_text().lower() and "not measured" in path.read_text()
    assert recipe.data.enable_thinking is (False if "qwen3" in name else None)
    assert recipe.model.attn_implementation == ("eager" if "gemma" in name else "sdpa")


def test_dataset_without_answer_field_is_clear(tmp_path, capsys):
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"question": "What is 2+2?", "solution": "4"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\nname = "builtin:tiny"\ntiny_layers = 4\ntiny_hidden = 64\ndevice = "cpu"\ndtype = "float32"\n'
        f'[data]\nname = "jsonl"\npath = "{data}"\n[log]\noutput_dir = "{tmp_path / "runs"}"\n'
    )
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "answer" in err, err
    assert not (tmp_path / "runs" / "r").exists()
