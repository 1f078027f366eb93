"""Does a VRA's replication listener take a TLS connection with a given client certificate?"""
from __future__ import annotations

import socket
import ssl

from appliance import pki
from appliance.vra import wire


def tls_probe(port: int, cert, key, server_ca, host: str = "127.0.0.1") -> str:
    """'accepted' when the VRA at ``host:port`` took the mutual-TLS connection of a client with
    ``cert``/``key`` (it then refuses the wrong token the probe sends in HELLO: a TLS-level
    answer), 'refused' when the TLS handshake or the first read failed, 'down' when nothing
    listens (a VRA restarting)."""
    ctx = pki.client_context(str(cert), str(key), str(server_ca))
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        return "down"
    try:
        s = ctx.wrap_socket(s, server_hostname=host)
        wire.send(s, wire.encode_json(wire.HELLO, {"token": "wrong", "source": "probe/1",
                                                   "vpg": "probe"}))
        wire.recv_json(s, wire.WELCOME)
    except ConnectionError as exc:
        return "accepted" if "authentication failed" in str(exc) else "refused"
    except (ssl.SSLError, OSError, wire.WireError):
        return "refused"
    finally:
        s.close()
    raise AssertionError("a wrong token was welcomed")
