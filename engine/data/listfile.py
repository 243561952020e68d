"""Text list files the image data layers read: ImageData's and convert-imageset's image list,
DenseImageData's image/label pairs and WindowData's window file.

Reading them fails the same way (a :class:`DataError` naming the layer and the file); each
layer parses the lines in its own format.
"""

from __future__ import annotations

from engine.errors import DataError


def list_lines(source: str, where: str, what: str, expect: str = "") -> list[tuple[int, str]]:
    """The non-blank lines of ``source`` with their 1-based line numbers, as read.

    ``what`` names the file in the error ("image list", "window file") when it cannot be read
    or is not text (an .h5 or LMDB file given as the list: a common slip); ``expect`` says what
    its lines hold.
    """
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{where}: cannot read the {what} '{source}': "
                        f"{exc.strerror or exc}") from exc
    try:
        if b"\0" in data:
            raise ValueError("it holds NUL bytes")
        text = data.decode("utf-8")
    except ValueError as exc:
        hint = f"; source must name a text file of lines '{expect}'" if expect else ""
        raise DataError(f"{where}: the {what} '{source}' is not a text file "
                        f"({exc}){hint}") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def empty_list_error(source: str, where: str, what: str, expect: str = "") -> DataError:
    """The error for a list file that holds no entries; ``expect`` shows the line format."""
    hint = f"; it must hold lines of '{expect}'" if expect else ""
    return DataError(f"{where}: the {what} '{source}' is empty{hint}")
