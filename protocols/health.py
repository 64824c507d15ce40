"""``python -m fedprompt.protocols.health grpc HOST:PORT``: exit 0 when a plaintext grpc.health.v1 endpoint
says SERVING.

For container health checks and probes: it imports only grpc (``fedprompt health`` is the same check through
the command line).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("protocol", choices=["grpc"], help="the health protocol to speak (grpc: grpc.health.v1)")
    p.add_argument("address", help="HOST:PORT of the health endpoint")
    p.add_argument("--service", default="", help="the service to ask about ('' = the server as a whole)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)")


def check(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedprompt.protocols.health", description=__doc__.splitlines()[0])
    add_arguments(p)
    return check(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
