"""The generated protobuf and gRPC modules (strata.v1 and grpc.health.v1), for direct use:

    from strata_client.pb import adaptation_pb2, adaptation_pb2_grpc

They are generated from the repository's proto/ when the package is built (setup.py), never
committed."""

try:
    from ._proto import (  # noqa: F401
        adaptation_pb2,
        adaptation_pb2_grpc,
        admin_pb2,
        admin_pb2_grpc,
        common_pb2,
        health_pb2,
        health_pb2_grpc,
        inference_pb2,
        inference_pb2_grpc,
    )
except ImportError as e:  # pragma: no cover - only in an unbuilt source tree
    raise ImportError(
        "strata_client: the gRPC stubs are not generated (" + str(e) + "); install the package "
        "(pip install --no-build-isolation ./clients/python) or, to run from the source tree, "
        "run `python3 setup.py build_protos` in clients/python"
    ) from e
