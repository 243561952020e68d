"""``engine parse-log`` and ``engine plot`` on a hand-written Caffe log and a real Moka log."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.logs import parse_log

CAFFE_LOG = Path(__file__).parent / "data" / "caffe_lenet_train.log"

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 6 dim: 4 } shape { dim: 6 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "t" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "y" bottom: "t" top: "acc"
  include { phase: TEST } }
"""
SOLVER = """
net: "net.prototxt"
test_iter: 2
test_interval: 3
base_lr: 0.1
lr_policy: "step"
gamma: 0.5
stepsize: 4
display: 2
max_iter: 9
snapshot_prefix: "snap/tiny"
snapshot_after_train: false
random_seed: 3
"""


def test_caffe_log_rows_match_parse_log_py(tmp_path):
    """Expected rows worked out by hand from the log's lines, following parse_log.py's rules.

    Seconds run from the 'Solving' line (14:02:08.987853). A row takes the last 'lr =' seen
    before it (the rate printed after iteration k's outputs lands in iteration k+1's row), the
    first row takes the second's rate, and the first row is pushed when the next one starts.
    """
    assert main(["parse-log", str(CAFFE_LOG), str(tmp_path)]) == 0
    train = (tmp_path / "caffe_lenet_train.log.train").read_bytes().decode()
    test = (tmp_path / "caffe_lenet_train.log.test").read_bytes().decode()
    assert train == ("NumIters,Seconds,LearningRate,loss\r\n"
                     "0.0,0.123016,0.01,2.32616\r\n"  # 09.110869 - 08.987853
                     "100.0,0.524289,0.01,0.212361\r\n"  # 09.512142
                     "200.0,1.033137,0.00992565,0.146893\r\n")  # 10.020990
    assert test == ("NumIters,Seconds,LearningRate,accuracy,loss\r\n"
                    "0.0,0.116366,0.00992565,0.0838,2.34962\r\n"  # 09.104219, rate of row 2
                    "200.0,1.029438,0.00992565,0.9632,0.117745\r\n"  # 10.017291
                    "300.0,1.54995,0.00985258,0.9741,0.0823061\r\n")  # 10.537803


def test_delimiter_and_missing_solving_line(tmp_path, capsys):
    assert main(["parse-log", str(CAFFE_LOG), str(tmp_path), "--delimiter", "\t"]) == 0
    first = (tmp_path / "caffe_lenet_train.log.train").read_text().splitlines()[0]
    assert first == "NumIters\tSeconds\tLearningRate\tloss"
    not_training = tmp_path / "test.log"
    not_training.write_text("I0412 14:02:08.512034 27195 caffe.cpp:218] Use CPU.\n")
    assert main(["parse-log", str(not_training), str(tmp_path)]) == 1
    assert "no 'Solving' line" in capsys.readouterr().err


def moka_training_log(folder: Path, capsys) -> Path:
    (folder / "net.prototxt").write_text(NET)
    (folder / "solver.prototxt").write_text(SOLVER)
    assert main(["train", "solver.prototxt"]) == 0
    log = folder / "moka_train.log"
    log.write_text(capsys.readouterr().err)
    return log


def test_moka_log_parses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    log = moka_training_log(tmp_path, capsys)
    text = log.read_text()
    train, test = parse_log(log)
    displayed = [int(m.group(1)) for m in
                 re.finditer(r"Iteration (\d+) \(.*\), loss = ", text)]
    assert [int(r["NumIters"]) for r in train] == displayed == [0, 2, 4, 6, 8]
    assert [int(r["NumIters"]) for r in test] == [0, 3, 6, 9]
    assert set(test[0]) == {"NumIters", "Seconds", "LearningRate", "acc", "loss"}
    # step policy: 0.1 for iterations 0-3, 0.05 for 4-7, 0.025 from 8; each row carries the
    # rate printed before it (the previous display), the first row the second's
    assert [r["LearningRate"] for r in train] == [0.1, 0.1, 0.1, 0.05, 0.05]
    seconds = [r["Seconds"] for r in train]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    losses = re.findall(r"Train net output #0: loss = (\S+)", text)
    assert [r["loss"] for r in train] == [float(v) for v in losses]
    assert main(["parse-log", str(log), str(tmp_path)]) == 0
    with open(tmp_path / "moka_train.log.test", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["acc"]) for r in rows] == [r["acc"] for r in test]


def test_plot_writes_a_png(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    log = moka_training_log(tmp_path, capsys)
    assert main(["plot", str(log), str(CAFFE_LOG), "runs.png"]) == 0
    png = (tmp_path / "runs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["plot", str(log), "seconds.png", "--x", "seconds"]) == 0
    assert (tmp_path / "seconds.png").is_file()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["plot", str(CAFFE_LOG), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert 'pip install "moka[plot]"' in err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(CAFFE_LOG)]) == 1
    assert "engine plot LOG [LOG...] OUT.png" in capsys.readouterr().err
