"""The pretrained tiny bases shipped in the package: current (their names still hash from the builder), intact,
used by the demo recipes instead of pretraining, and rebuilt by `lowres-reft build-base`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowres_reft.cli import main
from lowres_reft.config import load_recipe
from lowres_reft.model.loader import model_path
from lowres_reft.tiny.builder import tiny_dir_name
from lowres_reft.tiny.shipped import MANIFEST_NAME, SHIPPED_DIR, read_manifest, shipped_base
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RECIPES = ["tiny-reasoning.toml", "tiny-cpu.toml"]


def stale_bases(manifest: dict) -> list[str]:
    """Shipped names that the builder would no longer give for their recorded arguments."""
    return [name for name, entry in manifest["bases"].items() if tiny_dir_name(**entry["builder"]) != name]


def test_shipped_bases_match_the_builder():
    manifest = read_manifest()
    assert manifest["bases"], "nothing shipped"
    stale = stale_bases(manifest)
    assert not stale, (f"shipped tiny bases {stale} no longer match the builder (its version, settings or task changed):"
                       f" rebuild them with `lowres-reft build-base recipes/{' recipes/'.join(SHIPPED_RECIPES)}`")


def test_stale_check_catches_a_changed_builder():
    manifest = json.loads(json.dumps(read_manifest()))
    name = next(iter(manifest["bases"]))
    manifest["bases"][name]["builder"]["pretrain_steps"] += 1  # what a builder change amounts to: another hash
    assert stale_bases(manifest) == [name]


def test_shipped_files_are_intact_and_small():
    for name, entry in read_manifest()["bases"].items():
        base = shipped_base(name)
        assert base == SHIPPED_DIR / name
        assert sorted(p.name for p in base.iterdir()) == sorted(entry["files"])
        assert entry["bytes"] < 4 << 20  # a few MB at most, in the package


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES)
def test_demo_recipes_load_the_shipped_base(recipe, tmp_path):
    cfg = load_recipe(ROOT / "recipes" / recipe).model
    assert cfg.tiny_pretrain_steps > 0
    assert Path(model_path(cfg, tmp_path)).parent == SHIPPED_DIR  # no pretraining, nothing written to the cache
    assert not any(tmp_path.iterdir())


def test_damaged_ship_is_an_error(tmp_path):
    name = next(iter(read_manifest()["bases"]))
    shutil.copytree(SHIPPED_DIR / name, tmp_path / name)
    shutil.copy(SHIPPED_DIR / MANIFEST_NAME, tmp_path / MANIFEST_NAME)
    assert shipped_base(name, tmp_path) == tmp_path / name
    with open(tmp_path / name / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(UsageError, match="damaged.*model.safetensors"):
        shipped_base(name, tmp_path)


def test_build_base_cli_short_build(tmp_path, capsys):
    """The builder as a command: a 20-step build of the tiny-cpu base into a folder, then found there."""
    out = tmp_path / "bases"
    code = main(["build-base", str(ROOT / "recipes" / "tiny-cpu.toml"), "--set", "model.tiny_pretrain_steps=20",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (name,) = read_manifest(out)["bases"]
    entry = read_manifest(out)["bases"][name]
    assert name == tiny_dir_name(**entry["builder"]) and entry["builder"]["pretrain_steps"] == 20
    assert entry["built"]["seconds"] > 0 and entry["built"]["torch"]
    assert shipped_base(name, out) == out / name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(entry["files"])


def test_build_base_refuses_a_recipe_without_a_pretrained_tiny_base(tmp_path, capsys):
    code = main(["build-base", str(ROOT / "recipes" / "tiny-cpu.toml"), "--set", "model.tiny_pretrain_steps=0",
                 "--out", str(tmp_path / "bases")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not use a pretrained tiny base" in err[0]
    assert not (tmp_path / "bases").exists()
