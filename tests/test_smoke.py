import socket

from .procs import Server


def test_every_model_echoes(server: Server) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"ping\x00\xff")
        got = b""
        while len(got) < 6:
            chunk = sock.recv(64)
            assert chunk
            got += chunk
    assert got == b"ping\x00\xff"
    assert server.stop() == 0
