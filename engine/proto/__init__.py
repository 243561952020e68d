"""pycaffe's ``caffe.proto`` package: ``from engine.proto import caffe_pb2`` (and
``import engine.proto.caffe_pb2``) give Moka's schema module, engine/caffe_pb2.py.

Top-level ``proto/`` is the schema's source folder, not this package.
"""

import sys

from engine import caffe_pb2

sys.modules[f"{__name__}.caffe_pb2"] = caffe_pb2

__all__ = ["caffe_pb2"]
