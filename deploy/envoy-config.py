#!/usr/bin/env python3
"""Print deploy/envoy.yaml with other ports: Envoy's listener, its admin API and the replicas.

    python3 deploy/envoy-config.py --listen 127.0.0.1:8080 --admin 127.0.0.1:9901 \\
        127.0.0.1:50051 127.0.0.1:50052 127.0.0.1:50053 > envoy.yaml

With the defaults (those above) it prints deploy/envoy.yaml unchanged, comments included: the
file stays the one documented config, and this only swaps its addresses (standard library only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "envoy.yaml"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_BACKENDS = ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]


def address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IP address: the cluster is STATIC) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


def socket_line(host: str, port: int) -> str:
    shown = f'"{host}"' if ":" in host else host  # an IPv6 address is not a plain YAML scalar
    return f"socket_address: {{ address: {shown}, port_value: {port} }}"


def swap(text: str, old: str, new: str) -> str:
    """Replace the one occurrence of `old`; fail loudly if envoy.yaml no longer has it."""
    if text.count(old) != 1:
        raise SystemExit(f"{TEMPLATE}: expected {old!r} once, found it {text.count(old)} times")
    return text.replace(old, new)


def render(listen: tuple[str, int], admin: tuple[str, int], backends: list[tuple[str, int]]) -> str:
    text = TEMPLATE.read_text()
    text = swap(text, socket_line(*address(DEFAULT_ADMIN)), socket_line(*admin))
    text = swap(text, socket_line(*address(DEFAULT_LISTEN)), socket_line(*listen))
    return swap(text, endpoints(address(b) for b in DEFAULT_BACKENDS), endpoints(backends))


def endpoints(backends: Iterable[tuple[str, int]]) -> str:
    """The `- endpoint:` entries of the replicas' one locality, as envoy.yaml writes them."""
    indent = " " * 14
    return "".join(
        f"{indent}- endpoint:\n{indent}    address:\n{indent}      {socket_line(*b)}\n" for b in backends
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", type=address, default=DEFAULT_LISTEN, help="where clients call Envoy")
    parser.add_argument(
        "--admin", type=address, default=DEFAULT_ADMIN, help="Envoy's admin API (keep it loopback)"
    )
    parser.add_argument(
        "backends", type=address, nargs="*", help="the replicas' HOST:PORT (default: 50051-50053)"
    )
    args = parser.parse_args(argv)
    backends = args.backends or [address(b) for b in DEFAULT_BACKENDS]
    sys.stdout.write(render(args.listen, args.admin, backends))


if __name__ == "__main__":
    main()
