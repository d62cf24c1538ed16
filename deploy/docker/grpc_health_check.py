"""Container health check: ask the server's grpc.health.v1 service whether it is SERVING.

Exit status 0 when the answer is SERVING, 1 for any other answer, an RPC error or a timeout,
which is what Docker's HEALTHCHECK expects. The image runs it as
`python /usr/local/lib/alignlens/grpc_health_check.py`; grpc_health_probe is not shipped by any
package registry, and grpcio-health-checking is already an alignlens dependency.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout_seconds: float) -> tuple[bool, str]:
    """One Health/Check call; returns (serving, what was seen)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    # with TLS on the main port, `--health-port` serves health alone in plaintext: ask there
    port = os.environ.get("ALIGNLENS_HEALTH_PORT") or os.environ.get("ALIGNLENS_PORT", "50051")
    if port == "0":
        port = os.environ.get("ALIGNLENS_PORT", "50051")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout-seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    serving, seen = check(args.address, args.service, args.timeout_seconds)
    print(f"{args.address} {args.service or '<server>'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
