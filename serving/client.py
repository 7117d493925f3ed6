"""A minimal client of the generate extension over HTTP (standard library only), for tests and the
serving benchmark: POST /generate and /generate_stream, and free loopback ports for a test server."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now (Triton takes no port 0)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def post(url: str, body: dict, timeout: float = 300):
    """(HTTP status, parsed JSON body); for .../generate_stream the list of its server-sent events'
    data objects."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if url.endswith("generate_stream"):
        return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    return status, json.loads(text)
