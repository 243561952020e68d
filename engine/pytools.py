"""Caffe's ``python/`` tools as subcommands: ``engine classify`` and ``engine detect``.

- ``classify`` is classify.py: an image, a folder of images or a .npy of H x W x K images →
  ``Classifier.predict`` → a .npy of (N, classes) probabilities. Same flags and defaults.
- ``detect`` is detect.py: windows from a CSV (``filename,ymin,xmin,ymax,xmax`` header, any
  column order) → ``Detector.detect_windows``. detect.py writes through pandas (CSV or a pandas
  HDF5 table); here a ``.csv`` output is written with the csv module (``filename``, the four
  window columns, ``class0..classN-1``) and a ``.h5`` output with h5py (datasets ``filename``,
  ``window`` and ``prediction``), so neither pandas nor PyTables is needed.

The defaults name the files of a Caffe checkout (the reference CaffeNet and the ILSVRC mean), as
in Caffe, relative to the working directory; a missing one is reported with the flag to set.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import time

import numpy as np

from engine.errors import MokaError

log = logging.getLogger(__name__)

CROP_MODES = ("list", "selective_search")
COORD_COLS = ("ymin", "xmin", "ymax", "xmax")
_CAFFENET = "models/bvlc_reference_caffenet/"
_MEAN = "python/caffe/imagenet/ilsvrc_2012_mean.npy"


class ToolError(MokaError):
    """A bad input or output file for classify/detect."""


# -- shared flags --------------------------------------------------------------------------------
def _model_flags(p: argparse.ArgumentParser, mean_help: str) -> None:
    p.add_argument("--model_def", default=_CAFFENET + "deploy.prototxt",
                   help="the deploy net prototxt")
    p.add_argument("--pretrained_model",
                   default=_CAFFENET + "bvlc_reference_caffenet.caffemodel",
                   help="the trained .caffemodel")
    p.add_argument("--gpu", action="store_true",
                   help="accepted for Caffe's command lines; Moka runs on the CPU")
    p.add_argument("--mean_file", default=_MEAN, help=mean_help)
    p.add_argument("--input_scale", type=float,
                   help="scale applied last, after the mean is subtracted")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="scale applied first, to the [0, 1] images (default 255)")
    p.add_argument("--channel_swap", default="2,1,0",
                   help="channel order of the net's input (default 2,1,0: RGB images to "
                        "Caffe's BGR)")


def _require(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise ToolError(f"{flag} '{path}' not found; pass {flag}=PATH")
    return path


def _load_npy(path: str, flag: str) -> np.ndarray:
    """A .npy array; never unpickles (an object array could run code when loaded)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ToolError(f"{flag} '{path}': cannot read as a .npy array of numbers: {exc}") from None


def _setup(args: argparse.Namespace) -> tuple[np.ndarray | None, list[int] | None]:
    """The mean and channel swap the flags give; switches the (CPU-only) mode as Caffe's."""
    from engine import mode

    if args.gpu:
        mode.set_mode_gpu()
    else:
        mode.set_mode_cpu()
    _require(args.model_def, "--model_def")
    _require(args.pretrained_model, "--pretrained_model")
    mean = None
    if args.mean_file:
        mean = _load_npy(_require(args.mean_file, "--mean_file"), "--mean_file")
    channel_swap = [int(s) for s in args.channel_swap.split(",")] if args.channel_swap else None
    return mean, channel_swap


# -- classify ------------------------------------------------------------------------------------
def classify(args: argparse.Namespace) -> int:
    """Classify images with a Classifier (Caffe's python/classify.py); writes a .npy."""
    from engine.caffe_io import load_image
    from engine.classifier import Classifier

    mean, channel_swap = _setup(args)
    image_dims = [int(s) for s in args.images_dim.split(",")]
    classifier = Classifier(args.model_def, args.pretrained_model, image_dims=image_dims,
                            mean=mean, input_scale=args.input_scale, raw_scale=args.raw_scale,
                            channel_swap=channel_swap)
    input_file = os.path.expanduser(args.input_file)
    if input_file.endswith("npy"):
        log.info("Loading file: %s", input_file)
        inputs = _load_npy(input_file, "input_file")
    elif os.path.isdir(input_file):
        log.info("Loading folder: %s", input_file)
        files = sorted(glob.glob(os.path.join(input_file, "*." + args.ext)))
        inputs = [load_image(f) for f in files]
    else:
        log.info("Loading file: %s", input_file)
        inputs = [load_image(_require(input_file, "input_file"))]
    if len(inputs) == 0:
        raise ToolError(f"no inputs in '{input_file}' (looked for *.{args.ext}; see --ext)")
    log.info("Classifying %d inputs.", len(inputs))
    start = time.time()
    predictions = classifier.predict(inputs, not args.center_only)
    log.info("Done in %.2f s.", time.time() - start)
    log.info("Saving results into %s", args.output_file)
    np.save(args.output_file, predictions)
    return 0


# -- detect --------------------------------------------------------------------------------------
def read_windows_csv(path: str) -> list[tuple[str, np.ndarray]]:
    """``(filename, windows (K, 4) as ymin, xmin, ymax, xmax)`` per image, in first-seen order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = reader.fieldnames or []
        missing = [c for c in ("filename", *COORD_COLS) if c not in fields]
        if missing:
            raise ToolError(f"{path}: the header must name filename, ymin, xmin, ymax, xmax; "
                            f"missing {', '.join(missing)} (header: {', '.join(fields)})")
        windows: dict[str, list[list[float]]] = {}
        for row in reader:
            try:
                box = [float(row[c]) for c in COORD_COLS]
            except (TypeError, ValueError):
                raise ToolError(f"{path}:{reader.line_num}: window coordinates must be "
                                f"numbers; got {[row[c] for c in COORD_COLS]}") from None
            windows.setdefault(row["filename"], []).append(box)
    result = []
    for name, boxes in windows.items():
        array = np.array(boxes)
        if np.all(array == np.round(array)):
            array = array.astype(np.int64)
        result.append((name, array))
    return result


def write_detections(detections: list[dict], path: str) -> None:
    """CSV (``filename,ymin,xmin,ymax,xmax,class0..``) or, for .h5, an h5py file."""
    lower = path.lower()
    if lower.endswith(".csv"):
        n_classes = len(detections[0]["prediction"]) if detections else 0
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", *COORD_COLS, *(f"class{i}" for i in range(n_classes))])
            for d in detections:
                writer.writerow([d["filename"], *np.asarray(d["window"]).tolist(),
                                 *(f"{v:.9g}" for v in np.ravel(d["prediction"]))])
        return
    if lower.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("filename", data=[d["filename"].encode() for d in detections])
            f.create_dataset("window", data=np.array([d["window"] for d in detections]))
            f.create_dataset("prediction",
                             data=np.array([np.ravel(d["prediction"]) for d in detections]))
        return
    raise ToolError(f"output file '{path}': give a .csv or .h5 name")


def detect(args: argparse.Namespace) -> int:
    """Windowed detection with a Detector (Caffe's python/detect.py); writes CSV or HDF5."""
    from engine.detector import Detector

    lower = args.input_file.lower()
    if not lower.endswith(("txt", "csv")):
        raise ToolError(f"Unknown input file type: '{args.input_file}' is not .txt or .csv")
    _require(args.input_file, "input_file")
    mean, channel_swap = _setup(args)
    if mean is not None and mean.shape[1:] != (1, 1):
        mean = mean.mean(1).mean(1)  # a per-channel mean, as detect.py
    detector = Detector(args.model_def, args.pretrained_model, mean=mean,
                        input_scale=args.input_scale, raw_scale=args.raw_scale,
                        channel_swap=channel_swap, context_pad=args.context_pad)
    start = time.time()
    log.info("Loading input...")
    if args.crop_mode == "list":
        if not lower.endswith("csv"):
            raise ToolError("--crop_mode list needs a .csv input with the header "
                            "filename,ymin,xmin,ymax,xmax")
        detections = detector.detect_windows(read_windows_csv(args.input_file))
    else:
        with open(args.input_file) as f:
            images = [line.strip() for line in f if line.strip()]
        detections = detector.detect_selective_search(images)
    log.info("Processed %d windows in %.3f s.", len(detections), time.time() - start)
    start = time.time()
    write_detections(detections, args.output_file)
    log.info("Saved to %s in %.3f s.", args.output_file, time.time() - start)
    return 0


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine classify`` and ``engine detect`` (called from engine/cli.py)."""
    p = add_command(subparsers, classify, "classify")
    p.add_argument("input_file", help="an image, a folder of images (see --ext) or a .npy of "
                                      "H x W x K images")
    p.add_argument("output_file", help="the .npy to write: (N, classes) probabilities")
    _model_flags(p, "a .npy mean image, K x H x W; '' subtracts no mean")
    p.add_argument("--center_only", action="store_true",
                   help="predict from the center crop only, not the average over ten crops")
    p.add_argument("--images_dim", default="256,256",
                   help="'height,width' the images are resized to before cropping "
                        "(default 256,256)")
    p.add_argument("--ext", default="jpg",
                   help="the image extension read from an input folder (default jpg)")

    p = add_command(subparsers, detect, "detect")
    p.add_argument("input_file", help="a .csv of windows (header filename, ymin, xmin, ymax, "
                                      "xmax; any column order) or a .txt of image paths")
    p.add_argument("output_file", help="the .csv or .h5 to write (its extension picks)")
    _model_flags(p, "a .npy mean image, K x H x W, averaged to one value per channel; '' "
                    "subtracts no mean")
    p.add_argument("--crop_mode", default="selective_search", choices=CROP_MODES,
                   help="where the windows come from: the input .csv (list), or selective "
                        "search on the .txt's images (default; needs "
                        "selective_search_ijcv_with_python)")
    p.add_argument("--context_pad", type=int, default=16,
                   help="pixels of context added around each window (default 16)")
