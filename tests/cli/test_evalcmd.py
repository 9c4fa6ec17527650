"""`lowres-reft eval`: Wilson interval and pass@k (pure), and the real command on the builtin tiny model."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize_lora, tiny_model_cfg

from lowres_reft.cli import main
from lowres_reft.config import DataConfig, EvalConfig, ExportConfig, LoraConfig, Recipe
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.run.checkpoint import write_manifest
from lowres_reft.run.evaluation import pass_at_k, summarize, wilson_interval

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT / "tests" / "fixtures" / "gsm8k_style.jsonl"
CI_LINE = re.compile(r"^pass@1 = (\d\.\d{3}) \((\d+)/(\d+) correct\), 95% CI \[(\d\.\d{3}), (\d\.\d{3})\] \(Wilson score interval\)$",
                     re.MULTILINE)
N = 6  # problems per integration eval
FAST = ["--n", str(N), "--max-new-tokens", "10", "--batch-size", "4"]


# --------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize("successes,n,low,high", [
    # Hand-computed from center = (p + z^2/2n) / (1 + z^2/n), half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2),
    # z = 1.959964:
    (8, 10, 0.4902, 0.9433),     # p = .8: center = .8192/1.38415 = .5918... -> [.4902, .9433]
    (0, 10, 0.0, 0.2775),        # p = 0: [0, z^2/n / (1 + z^2/n)] = [0, .38415/1.38415]
    (10, 10, 0.7225, 1.0),       # mirror image of 0/10
    (50, 100, 0.4038, 0.5962),   # center .5, half = 1.95996/1.038415 * sqrt(.0025 + .0000960) = .0962
    (1, 1, 0.2065, 1.0),         # p = 1, n = 1: lower = 1/(1 + z^2)
])
def test_wilson_interval_hand_values(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)
    assert lo <= successes / n <= hi


def test_wilson_interval_properties_and_errors():
    lo, hi = wilson_interval(30, 100, confidence=0.99)
    lo95, hi95 = wilson_interval(30, 100)
    assert lo < lo95 < 0.3 < hi95 < hi  # wider at 99%
    a, b = wilson_interval(2.5, 10)  # fractional success counts (sampled scores) are allowed
    assert 0 < a < 0.25 < b < 1
    for bad in [(1, 0), (11, 10), (-1, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n = k: any correct
    assert 0.0 < pass_at_k(200, 3, 10) < 1.0  # large n stays finite and exact
    for bad in [(3, 1, 4), (3, 1, 0), (3, 4, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summarize():
    flags = [[True, False, False], [False, False, False], [True, True, True], [False, True, False]]
    stats = summarize(flags, k=2)
    assert stats["n"] == 4 and stats["problems_solved"] == 3
    expected = [pass_at_k(3, sum(f), 2) for f in flags]
    assert stats["scores"] == pytest.approx(expected)
    assert stats["pass_at_k"] == pytest.approx(sum(expected) / 4)
    assert stats["mean_accuracy"] == pytest.approx((1 / 3 + 0 + 1 + 1 / 3) / 4)
    assert tuple(stats["pass_at_k_ci"]) == pytest.approx(wilson_interval(sum(expected), 4))
    greedy = summarize([[True], [False], [True]], k=1)
    assert greedy["pass_at_k"] == greedy["mean_accuracy"] == pytest.approx(2 / 3)


# -------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models decode far faster on one thread, and much more so on a busy shared CPU (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """runs/ with the session's tiny model cache and one fake trainer checkpoint (random LoRA, 4-bit base)."""
    from lowres_reft.model.loader import load_policy

    root = tmp_path_factory.mktemp("eval-runs")
    (root / "_builtin").symlink_to(tiny_cache / "_builtin", target_is_directory=True)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    model_cfg = tiny_model_cfg(load_in_4bit=True)
    policy = load_policy(model_cfg, lora, cache_dir=root)
    randomize_lora(policy.model, seed=3, scale=0.5)
    ckpt = root / "run-a" / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    policy.model.save_pretrained(ckpt / "adapter")
    recipe = Recipe(model=model_cfg, lora=lora, export=ExportConfig(merged_dtype="float32"),
                    data=DataConfig(name="builtin:arithmetic", builtin_test_size=16, max_eval_samples=8),
                    eval=EvalConfig(max_new_tokens=10, batch_size=4))
    (ckpt / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    write_manifest(ckpt, 1)
    os.symlink("checkpoint-000001", root / "run-a" / "checkpoint-last")
    return root


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    from lowres_reft.run.export import export_checkpoint

    out = tmp_path_factory.mktemp("eval-merged") / "merged"
    export_checkpoint(runs / "run-a" / "checkpoint-last", merged_out=out, merged_dtype="float32")
    return out


def test_checkpoint_run_dir_and_merged_export_agree(runs, merged, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a run dir means its checkpoint-last; the default output goes next to the checkpoints
    code, out, err = _eval(capsys, runs / "run-a", *FAST)
    assert code == 0, err[-2000:]
    preds = runs / "run-a" / f"eval-checkpoint-000001-builtin-arithmetic-test-n{N}.jsonl"
    assert f"predictions: {preds}" in out
    match = CI_LINE.search(out)
    assert match, out
    acc, correct, n, lo, hi = match.groups()
    assert int(n) == N and float(lo) <= float(acc) <= float(hi)
    assert "checkpoint checkpoint-000001 of builtin:tiny (4-bit NF4 + LoRA)" in out
    ckpt_rows = _rows(preds)
    assert [r["index"] for r in ckpt_rows] == list(range(N))
    for row in ckpt_rows:
        assert set(row) == {"index", "question", "gold", "completions", "answers", "correct", "truncated", "tokens", "score"}
        assert len(row["completions"]) == len(row["answers"]) == len(row["correct"]) == 1
        assert row["score"] == float(row["correct"][0])
    assert sum(r["correct"][0] for r in ckpt_rows) == int(correct)
    assert any(r["completions"][0] for r in ckpt_rows)  # the random adapter makes the model say something
    assert not list(preds.parent.glob(".*tmp*"))

    # the same weights merged into float32: same prompts (recipe data = builtin:arithmetic), same predictions
    code, out, err = _eval(capsys, merged, "--data", "builtin:arithmetic", "--out", tmp_path / "m.jsonl", *FAST)
    assert code == 0, err[-2000:]
    assert "no LoRA" in out
    merged_rows = _rows(tmp_path / "m.jsonl")
    assert [r["question"] for r in merged_rows] == [r["question"] for r in ckpt_rows]
    assert [r["gold"] for r in merged_rows] == [r["gold"] for r in ckpt_rows]
    differ = sum(a["completions"] != b["completions"] for a, b in zip(ckpt_rows, merged_rows))
    assert differ <= 1, (ckpt_rows, merged_rows)  # float32 merge == dequantized 4-bit + LoRA up to rounding

    # answers the model actually gives, used as gold: the scoring path counts them correct
    given = [r for r in merged_rows if r["answers"][0] is not None]
    data = tmp_path / "self.jsonl"
    assert given, merged_rows  # the random adapter writes digits now and then
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answers"][0]}) + "\n" for r in given),
                    encoding="utf-8")
    code, out, err = _eval(capsys, merged, "--data", "jsonl", "--data-path", data, "--json", "--out", tmp_path / "s.jsonl",
                           "--max-new-tokens", "10", "--batch-size", "4")
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    assert summary["pass_at_k"] == 1.0 and summary["n"] == len(given) and summary["problems_solved"] == len(given)
    match = CI_LINE.search(err)  # with --json the text goes to stderr
    assert match and match.group(2) == match.group(3) == str(len(given)) and match.group(5) == "1.000"


def test_builtin_tiny_json_default_out_and_4bit(tiny_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _eval(capsys, "builtin:tiny", "--data", "builtin:arithmetic", "--cache-dir", tmp_path / "cache",
                           "--load-in-4bit", "--json", *FAST)
    assert code == 0, err[-2000:]
    summary = json.loads(out)  # stdout holds only the JSON summary
    assert summary["kind"] == "builtin" and summary["model"] == "builtin:tiny" and summary["load_in_4bit"] is True
    assert summary["n"] == N and summary["greedy"] and summary["ci"] == "wilson"
    assert summary["pass_at_k_ci"][0] <= summary["pass_at_k"] <= summary["pass_at_k_ci"][1]
    out_path = tmp_path / f"builtin-tiny-eval-builtin-arithmetic-test-n{N}.jsonl"
    assert summary["out"] == out_path.name and len(_rows(out_path)) == N
    assert (tmp_path / "cache" / "_builtin").is_dir()  # built where --cache-dir says


def test_sampled_pass_at_k_and_gsm8k_fixture(merged, tmp_path, capsys):
    args = [merged, "--data", "gsm8k", "--data-path", GSM8K, "--k", "2", "--samples", "3", "--temperature", "1.0",
            "--seed", "7", "--max-new-tokens", "8", "--batch-size", "8", "--json"]
    code, out, err = _eval(capsys, *args, "--out", tmp_path / "a.jsonl")
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    rows = _rows(tmp_path / "a.jsonl")
    golds = [json.loads(line)["answer"].rsplit("####", 1)[1].strip().replace(",", "") for line in GSM8K.read_text().splitlines()]
    assert sorted(r["gold"] for r in rows) == sorted(golds) and summary["n"] == len(golds)
    for row in rows:
        assert len(row["completions"]) == 3
        assert row["score"] == pytest.approx(pass_at_k(3, sum(row["correct"]), 2))
    assert summary["pass_at_k"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))
    assert summary["k"] == 2 and summary["samples"] == 3 and not summary["greedy"]
    assert "pass@2 = " in err and "unbiased estimator from 3 samples/problem" in err and "mean per-sample accuracy" in err
    # seeded: the same command gives the same samples; another seed other samples
    code, out, _ = _eval(capsys, *args, "--out", tmp_path / "b.jsonl")
    assert code == 0 and _rows(tmp_path / "b.jsonl") == rows
    code, _, _ = _eval(capsys, *args[:-1], "--seed", "8", "--out", tmp_path / "c.jsonl")
    assert code == 0 and [r["completions"] for r in _rows(tmp_path / "c.jsonl")] != [r["completions"] for r in rows]


BAD = [
    (["{tmp}/nothing"], "no such model"),
    (["{tmp}/afile.txt"], "it is a file"),
    (["{tmp}/emptydir"], "not a model directory"),
    (["{tmp}/emptyrun"], "no checkpoint"),
    (["{tmp}/adapteronly"], "adapter-only"),
    (["{tmp}/halfckpt"], "no recipe.toml"),
    (["builtin:huge"], "unknown builtin model"),
    (["builtin:tiny", "--k", "0"], "--k 0"),
    (["builtin:tiny", "--n", "0"], "--n 0"),
    (["builtin:tiny", "--k", "4"], "--temperature"),
    (["builtin:tiny", "--k", "4", "--samples", "2", "--temperature", "1"], "--samples 2"),
    (["builtin:tiny", "--temperature", "-1"], "--temperature"),
    (["builtin:tiny", "--top-p", "0"], "--top-p"),
    (["builtin:tiny", "--batch-size", "0"], "--batch-size"),
    (["builtin:tiny", "--data", "gsm9k"], 'did you mean "gsm8k"'),
    (["builtin:tiny", "--data", "jsonl"], "path"),
    (["builtin:tiny", "--data", "gsm8k", "--data-path", "{tmp}/no.jsonl"], "no such file"),
    (["builtin:tiny", "--data", "builtin:arithmetic", "--out", "{tmp}/emptydir"], "is a directory"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[f"{i}-{b[1][:14]}" for i, b in enumerate(BAD)])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptyrun").mkdir()
    (tmp_path / "emptyrun" / "metrics.jsonl").write_text("")
    (tmp_path / "adapteronly").mkdir()
    (tmp_path / "adapteronly" / "adapter_config.json").write_text("{}")
    (tmp_path / "halfckpt" / "adapter").mkdir(parents=True)
    (tmp_path / "halfckpt" / "adapter" / "adapter_config.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = _eval(capsys, *[a.format(tmp=tmp_path) for a in args], "--cache-dir", tmp_path / "cache")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "lowres_reft", "eval", str(tmp_path / "missing")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
