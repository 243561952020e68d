import pytest

from engine.data.listfile import empty_list_error, list_lines
from engine.errors import DataError


def test_list_lines_skips_blank_lines_and_keeps_numbers(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a 1\n\n   \t\nb c 2  \n")
    assert list_lines(str(path), "L", "image list") == [(1, "a 1"), (4, "b c 2  ")]


def test_an_unreadable_list_names_the_layer_the_kind_and_the_file(tmp_path):
    missing = str(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match=r"^W: cannot read the window file '.*nothing\.txt'"):
        list_lines(missing, "W", "window file")


def test_the_empty_list_error_shows_the_expected_format():
    assert str(empty_list_error("l.txt", "L", "image list", "path label")) == (
        "L: the image list 'l.txt' is empty; it must hold lines of 'path label'")
    assert str(empty_list_error("w.txt", "W", "window file")) == (
        "W: the window file 'w.txt' is empty")
