"""Bad input to ``experiments.yelp_imdb``: each case exits non-zero with one paragraph naming the problem and the
fix, no traceback, and writes nothing (a fresh --out is not created; existing files are left as they were)."""

import json
import pathlib
import shutil

import pytest

from experiments import yelp_imdb

TINY = ["--preset", "cpu", "--data.n-train-yelp", "16", "--data.n-train-imdb", "16", "--data.n-test", "8",
        "--data.n-val", "4", "--data.max-len", "16", "--optim.batch-size", "4", "--stages.replay-batch-size", "4",
        "--run.eval-batch-size", "4", "--first.steps", "2", "--stages.steps", "2", "--stages.buffer-size", "8",
        "--no-progress", "--method", "naive"]


def rows(path: pathlib.Path, n: int) -> list[str]:
  with path.open() as f:
    return [next(f) for _ in range(n)]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir):
  """40 real rows per split and task: the data every case starts from (a case may spoil a copy)."""
  root = tmp_path_factory.mktemp("data")
  for task in ("yelp", "imdb"):
    (root / task).mkdir()
    for split in ("train", "test"):
      (root / task / f"{split}.jsonl").write_text("".join(rows(data_dir / task / f"{split}.jsonl", 40)))
  return root


def spoil(root: pathlib.Path, tmp: pathlib.Path, text: str) -> pathlib.Path:
  """A copy of the data with yelp/train.jsonl's second line replaced by ``text``."""
  copy = tmp / "spoilt"
  shutil.copytree(root, copy)
  lines = (copy / "yelp" / "train.jsonl").read_text().splitlines(keepends=True)
  lines[1] = text + "\n"
  (copy / "yelp" / "train.jsonl").write_text("".join(lines))
  return copy


def broken_model(tmp: pathlib.Path, what: str) -> pathlib.Path:
  from fipjax.models import hub
  model = tmp / "model"
  shutil.copytree(hub.packaged_minilm_dir(), model)
  if what == "weights":
    blob = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(blob[:len(blob) // 2])
  else:
    (model / "config.json").write_text("{not json")
  return model


def occupied(tmp: pathlib.Path, kind: str) -> pathlib.Path:
  out = tmp / "out"
  if kind == "file":
    out.write_text("a file")
    return out
  out.mkdir()
  name = "results.json" if kind == "finished" else "notes.txt"
  (out / name).write_text(json.dumps({"someone": "else"}))
  return out


# (flags, exit code, words the message must hold); "{data}", "{tmp}" are filled in per case.
CASES = [
    (["--stages.steps", "-5"], 2, "--stages.steps must be > 0"),
    (["--first.steps", "0"], 2, "--first.steps must be > 0"),
    (["--optim.lr", "0"], 2, "--optim.lr must be > 0"),
    (["--optim.lr=-1e-3"], 2, "--optim.lr must be > 0"),
    (["--fip.beta=-1"], 2, "--fip.beta must be ≥ 0"),
    (["--optim.batch-size", "0"], 2, "--optim.batch-size must be > 0"),
    (["--run.checkpoint-every", "0"], 2, "--run.checkpoint-every must be > 0"),
    (["--run.record-every", "0"], 2, "--run.record-every must be > 0"),
    (["--data.n-test", "0"], 2, "--data.n-test must be > 0"),
    (["--data.n-val", "0"], 2, "--data.n-val must be > 0"),
    (["--data.max-len", "0"], 2, "--data.max-len must be > 0"),
    (["--optim.lr", "fast"], 2, "expected a number"),
    (["--optim.dropout", "maybe"], 2, "expected true or false"),
    (["--model.heads", "both"], 2, "--model.heads must be one of shared, per-task"),
    (["--model.dtype", "float16"], 2, "--model.dtype must be one of"),
    (["--fip.distance", "cosine"], 2, "--fip.distance must be one of"),
    (["--method", "sgd"], 2, "unknown method 'sgd'"),
    (["--method", "lora-si"], 2, "has no LoRA form"),
    (["--si.strength=-1"], 2, "--si.strength must be ≥ 0"),
    (["--bir.generator.latent", "0"], 2, "--bir.generator.latent must be > 0"),
    (["--preset", "laptop"], 2, "invalid choice: 'laptop'"),
    (["--data.dir", "{tmp}/missing"], 2, "does not exist"),
    (["--model.name", "{tmp}/no-model"], 2, "does not exist"),
    (["--data.max-len", "600"], 2, "exceeds the model's 512 position embeddings"),
    (["--data.n-val", "100"], 2, "leaves no yelp training rows"),
    (["--optim.batch-size", "64", "--stages.replay-batch-size", "64", "--stages.buffer-size", "64",
      "--run.eval-batch-size", "64"], 2,
     "fewer than one batch"),
    (["SPOIL", '{"text": "fine", "label": 2.5}'], 2, "labels must be integers"),
    (["SPOIL", '{"text": "fine", "label": 2'], 2, "line 2: not valid JSON"),
    (["SPOIL", '["fine", 2]'], 2, "line 2: not a JSON object"),
    (["SPOIL", '{"text": "fine", "label": 9}'], 2, "labels must lie in 0..4"),
    (["SPOIL", '{"text": "fine"}'], 2, "rows [1] hold [None]"),
    (["MODEL", "weights"], 2, "model.safetensors"),
    (["MODEL", "config"], 2, "config.json"),
    (["OUT", "file"], 2, "is a file"),
    (["OUT", "other"], 2, "files of another run"),
    (["OUT", "finished"], 2, "never overwritten"),
    (["--cache-dir", "{tmp}/cachefile"], 2, "--cache-dir"),
    (["--stages.buffer-size", "2"], 2, "--stages.buffer-size 2 keeps fewer rows than one replay batch"),
]


@pytest.mark.parametrize("flags, code, words", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input(flags, code, words, tmp_path, small_data, capsys):
  data, out, cache = small_data, tmp_path / "run", tmp_path / "cache"
  if flags[0] == "SPOIL":
    data, flags = spoil(small_data, tmp_path, flags[1]), []
  elif flags[0] == "MODEL":
    flags = ["--model.name", str(broken_model(tmp_path, flags[1]))]
  elif flags[0] == "OUT":
    out, flags = occupied(tmp_path, flags[1]), []
  (tmp_path / "cachefile").write_text("not a directory")
  flags = [f.format(data=data, tmp=tmp_path) for f in flags]
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  argv = TINY + ["--data.dir", str(data), "--out", str(out), "--cache-dir", str(cache)] + flags
  try:
    got = yelp_imdb.main(argv)
  except SystemExit as e:        # argparse-level errors
    got = e.code
  err = capsys.readouterr().err.strip()
  assert got == code, err
  assert words in err, err
  assert err.startswith("error:") and "Traceback" not in err and "\n\n" not in err, err
  assert len(err) < 1200, err
  after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  assert after == before                                   # nothing written, nothing overwritten
  if flags and flags[0] != "OUT":
    assert not out.exists()


def test_enough_cases():
  assert len(CASES) >= 25


def test_read_only_out_is_refused_at_once(tmp_path, small_data, capsys):
  target = pathlib.Path("/sys/fipjax-test-out")
  try:
    target.mkdir()
    target.rmdir()
    pytest.skip("/sys is writable here: no read-only file system to try")
  except OSError:
    pass
  assert yelp_imdb.main(TINY + ["--data.dir", str(small_data), "--out", str(target)]) == 2
  err = capsys.readouterr().err
  assert "--out" in err and "is not writable" in err and "Traceback" not in err
  assert yelp_imdb.main(TINY + ["--data.dir", str(small_data), "--out", str(tmp_path / "run"),
                                "--cache-dir", str(target)]) == 2       # refused at once, not after an orbax timeout
  err = capsys.readouterr().err
  assert "--cache-dir" in err and "is not writable" in err and not (tmp_path / "run").exists()
