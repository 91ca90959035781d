"""The package as pip installs it: recipes and DeepSpeed configs inside it, found outside any checkout."""

import json
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO, base_env

PROBE = r'''
import json, sys
import medcare_dist
from medcare_dist.config import load_config
from medcare_dist.training.ds_config import build_ds_config, resolve_ds_config_path
cfg = load_config("demo", ["stage1.max_steps=2"])
ds = build_ds_config(cfg, cfg.stage1, 2, "fp32")
print(json.dumps({"package": medcare_dist.__file__, "ds_config": str(resolve_ds_config_path(cfg.deepspeed.config)),
                  "stage": ds["zero_optimization"]["stage"], "epochs": cfg.stage1.epochs,
                  "recipes": sorted(p.name for p in __import__("pathlib").Path(medcare_dist.__file__).parent.joinpath(
                      "shipped_recipes").glob("*.yaml"))}))
'''


def test_an_installed_wheel_finds_its_recipes_and_ds_configs_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                           "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(wheels.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("medcare_dist/training/integrity.py", "medcare_dist/shipped_recipes/demo.yaml",
                "medcare_dist/shipped_ds_configs/zero3.json",
                "medcare_dist/shipped_ds_configs/zero3_cpu.json", "kernels/mixture_lora.py", "kernels/lora_linear.py",
                "kernels/swiglu.py"):
        assert rel in names, rel
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**base_env(), "PYTHONPATH": str(target)}                  # not the checkout
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=outside, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(target))
    assert got["ds_config"] == str(target / "medcare_dist" / "shipped_ds_configs" / "zero3_cpu.json")  # demo.yaml's
    assert got["stage"] == 3 and got["epochs"] == 16
    assert got["recipes"] == sorted(p.name for p in (REPO / "launch" / "recipes").glob("*.yaml"))
