"""The generated protobuf / gRPC modules, generated first if needed.

Everything in the package that touches a dsync message imports it from here,
so the lazy generation in :func:`dsync_client.codegen.ensure` happens exactly
once, on first use.
"""

from __future__ import annotations

from . import codegen

codegen.ensure()

from ._gen.dsync.admin.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from ._gen.dsync.common.v1 import common_pb2  # noqa: E402
from ._gen.dsync.lock.v1 import lock_pb2, lock_pb2_grpc  # noqa: E402

__all__ = ["admin_pb2", "admin_pb2_grpc", "common_pb2", "lock_pb2", "lock_pb2_grpc"]
