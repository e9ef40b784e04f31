"""Reference echo server: the standard library's socketserver.ThreadingTCPServer.

python socketserver_echo.py PORT      (0 = any free port)
"""

import logging
import socket
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Same per-connection setting as every echoplex model, so latency compares fairly.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096  # the listen backlog echoplex uses (the default is 5)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Server(("127.0.0.1", int(sys.argv[1])), Echo) as server:
        logging.info("listening on %s:%d", *server.server_address)
        server.serve_forever()
