"""docs/extending.md's worked example runs as written: a new method in one file is a method of every experiment."""

import json
import pathlib
import re

import numpy as np

from fipjax import continual

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_a_new_method_in_one_file(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  method_file, run = blocks[0], blocks[1].replace("runs/digits-l2", str(tmp_path / "run"))
  monkeypatch.setattr(continual, "REGISTRY", dict(continual.REGISTRY))     # the test's entry goes with it
  exec(compile(method_file, "l2_method.py", "exec"), {})
  assert continual.parse_name("lora-l2").method == "l2" and str(continual.parse_name("l2-dpo", on_preferences=True))
  exec(compile(run, "run.py", "exec"), {})
  methods = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]
  assert list(methods) == ["naive", "l2", "lora-l2"]
  naive, l2 = methods["naive"], methods["l2"]
  assert naive["accuracy_matrix"][0] == l2["accuracy_matrix"][0]                  # one first stage
  assert l2["weight_change"] < naive["weight_change"]                            # pulled back towards θ₀
  assert np.isfinite(methods["lora-l2"]["loss_curve"]).all()
