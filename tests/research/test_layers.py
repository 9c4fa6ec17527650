"""`lowres-reft layers`: the per-layer report on a tiny model, and the rank correlation it prints."""

import json
import math

from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.cli import main
from lowres_reft.research.layers import spearman


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ranks x = (0, 1, 2), y = (1.5, 0, 1.5) -> cov 0, a tie on y
    assert spearman([1, 2, 3], [5, 1, 5]) == 0.0
    assert math.isnan(spearman([1, 1], [2, 3]))


def test_layers_report_on_a_tiny_model(tmp_path, capsys):
    sets = TINY_RUN_SETS + [f"log.output_dir={tmp_path}", "model.tiny_layers=5"]
    out = tmp_path / "layers.json"
    code = main(["layers", "recipes/tiny-cpu.toml", *as_set_args(sets), "--texts", "6", "--prompts", "2", "--samples", "2",
                 "--json", str(out), "--plot", str(tmp_path / "layers.png")])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    layers = report["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3, 4]
    assert [r["skippable"] for r in layers] == [False, True, True, True, False]  # protect_first = protect_last = 1
    for r in layers:
        assert 0.0 <= r["influence"] <= 2.0
        assert (r["kl"] is None) == (not r["skippable"])
        if r["skippable"]:
            assert r["kl"] >= 0.0 and 0.0 < r["ess"] <= 1.0 and r["mean_abs_log_rho"] >= 0.0
    assert sorted(report["summary"]["least_influential_first"]) == [1, 2, 3]
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert "| layer | block influence |" in capsys.readouterr().out


def test_layers_refuses_bad_counts(capsys):
    assert main(["layers", "recipes/tiny-cpu.toml", "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples must be >= 1" in err[0]
