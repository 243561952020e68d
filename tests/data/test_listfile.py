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


def test_a_binary_file_given_as_the_list_is_refused_with_the_expected_format(tmp_path):
    binary = tmp_path / "rows.h5"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\0\0\0")
    with pytest.raises(DataError, match=r"^L: the image list '.*rows\.h5' is not a text file "
                                        r"\(it holds NUL bytes\); source must name a text "
                                        r"file of lines 'path label'$"):
        list_lines(str(binary), "L", "image list", "path label")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9.png 1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"'.*latin1\.txt' is not a text file \('utf-8' codec"):
        list_lines(str(latin1), "L", "image list")


def test_hdf5_data_given_an_h5_file_as_its_source_says_so(tmp_path):
    import h5py

    from engine.data.hdf5 import read_file_list

    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f["data"] = [1.0, 2.0]
    with pytest.raises(DataError, match=r"HDF5 list file .* is not a text file .*lines "
                                        r"'path/to/file\.h5'"):
        read_file_list(str(path), "H")
