"""User-facing errors: each names the file, line, layer or blob at fault and what to do."""


class MokaError(Exception):
    """A problem with the user's input (files, nets, shapes). The CLI prints it as one line."""


class ParseError(MokaError):
    """A prototxt or binary proto that cannot be read; the message carries ``file:line:col``."""


class NetError(MokaError):
    """A net that cannot be built: unknown layer type or bottom, bad wiring, shape mismatch."""


class LayerError(NetError):
    """A layer's parameters or bottoms do not fit; the message names the layer and its type."""

    def __init__(self, layer_name: str, layer_type: str, message: str) -> None:
        super().__init__(f"layer '{layer_name}' ({layer_type}): {message}")
        self.layer_name = layer_name
        self.layer_type = layer_type


class DataError(MokaError):
    """A data source that is missing, empty or holds records of the wrong kind."""


class SolverError(MokaError):
    """A solver file or snapshot that cannot be used."""


class ResourceError(MokaError):
    """A net that would need more memory than the limit allows; raised before allocating.

    ``shape`` and ``nbytes`` are the blob that did not fit (the Net adds the layer's name).
    """

    def __init__(self, message: str, shape: tuple[int, ...] = (), nbytes: int = 0) -> None:
        super().__init__(message)
        self.shape = shape
        self.nbytes = nbytes
