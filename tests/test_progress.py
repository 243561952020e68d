"""The live progress line: drawn only on a terminal, never inside a log line."""

from __future__ import annotations

import io
import re

import pytest
from test_cli import GLOG, write_solver

from engine.cli import main
from engine.progress import ERASE_LINE, StatusStream, data_size, status_line


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows: each line is what follows its last erase-line."""
    return [line.split(ERASE_LINE)[-1] for line in raw.split("\n")]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_solver(tmp_path, max_iter=6)
    return tmp_path


def test_status_stream_keeps_the_status_below_log_lines():
    out = FakeTTY()
    clock = iter(range(100)).__next__
    stream = StatusStream(out, min_interval=0, clock=clock)
    stream.set_status("[train] 1/3")
    stream.write("I0101 log one\n")
    stream.set_status("[train] 2/3")
    stream.write("I0101 log two\n")
    stream.clear()
    assert screen(out.getvalue()) == ["I0101 log one", "I0101 log two", ""]
    assert out.getvalue() == ("[train] 1/3" + ERASE_LINE + "I0101 log one\n[train] 1/3"
                              + ERASE_LINE + "[train] 2/3" + ERASE_LINE + "I0101 log two\n"
                              "[train] 2/3" + ERASE_LINE)


def test_status_is_throttled_but_log_lines_redraw_it():
    out = FakeTTY()
    now = [0.0]
    stream = StatusStream(out, min_interval=1.0, clock=lambda: now[0])
    stream.set_status("a")
    now[0] = 0.5
    stream.set_status("b")  # too soon: not drawn
    assert screen(out.getvalue()) == ["a"]
    stream.write("log\n")  # a log line redraws the newest status
    assert screen(out.getvalue()) == ["log", "b"]
    stream.set_status("c", force=True)
    assert screen(out.getvalue()) == ["log", "c"]


def test_status_line_fields():
    line = status_line("train", 50, 200, 25.0, [("loss", "0.5"), ("lr", "0.01")])
    assert line == "[train] 50/200 25% | 25 it/s | ETA 6s | loss 0.5 | lr 0.01"
    assert status_line("test", 1, 10, None, []) == "[test] 1/10 10%"
    assert "ETA 1m40s" in status_line("train", 0, 1000, 10.0, [])


def test_train_on_a_terminal_shows_progress_and_intact_log_lines(workdir, monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    assert main(["train", "solver.prototxt"]) == 0
    raw = fake.getvalue()
    lines = screen(raw)
    assert lines[-1] == ""  # the status is erased at the end
    assert all(GLOG.match(line) for line in lines[:-1]), [ln for ln in lines if
                                                          not GLOG.match(ln)]
    statuses = re.findall(r"\[train\] (\d+)/6 [^\r\n]*", raw)
    assert statuses and statuses[-1] == "6"
    assert re.search(r"\[train\] 6/6 100% \| [\d.e+]+ it/s \| loss [\d.e+-]+ \| lr 0\.1", raw)
    assert "Optimization Done." in raw


def test_test_on_a_terminal_shows_progress(workdir, monkeypatch):
    assert main(["train", "solver.prototxt"]) == 0
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    assert main(["test", "-model", "net.prototxt", "-weights", "snap/tiny_iter_6.caffemodel",
                 "-iterations", "3"]) == 0
    raw = fake.getvalue()
    assert all(GLOG.match(line) for line in screen(raw)[:-1])
    assert "[test] 3/3 100%" in raw and "mean loss" in raw


def test_no_progress_when_not_a_terminal_or_asked(workdir, monkeypatch, capsys):
    assert main(["train", "solver.prototxt"]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "[train]" not in err
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    assert main(["train", "solver.prototxt", "--no_progress"]) == 0
    assert "\x1b" not in fake.getvalue()


def test_an_error_line_is_never_on_the_status_line(workdir, monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    net = (workdir / "net.prototxt").read_text()  # the log of negative scores is NaN
    (workdir / "net.prototxt").write_text(net.replace(
        'layer { name: "loss"', 'layer { name: "log" type: "Log" bottom: "y" top: "y" }\n'
        'layer { name: "loss"'))
    assert main(["train", "solver.prototxt"]) == 1
    lines = screen(fake.getvalue())
    assert lines[-2].startswith("engine: error: training diverged")


def test_epoch_from_the_data_layers_size(tmp_path):
    import numpy as np

    from engine.data import array_to_datum, write_lmdb
    from solvers import get_solver

    images = np.zeros((10, 1, 2, 2), np.uint8)
    write_lmdb(str(tmp_path / "db"), [(f"{i:08d}".encode(), array_to_datum(images[i], 0)
                                       .SerializeToString()) for i in range(10)])
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "Data" top: "x" top: "y" data_param { source: "%s" '
        "batch_size: 4 backend: LMDB } }" % (tmp_path / "db"))
    (tmp_path / "s.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.1 '
                                         'lr_policy: "fixed" max_iter: 1')
    assert data_size(get_solver(str(tmp_path / "s.prototxt")).net) == (10, 4)
