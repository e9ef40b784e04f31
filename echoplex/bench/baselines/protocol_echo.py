"""Reference echo server: an asyncio Protocol whose data_received writes the data back,
on the standard library's event loop or on uvloop (`pip install uvloop`).

python protocol_echo.py PORT [asyncio|uvloop]      (0 = any free port; default asyncio)
"""

import asyncio
import logging
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio and uvloop set TCP_NODELAY on TCP transports themselves.
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        Echo, "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    logging.info("listening on %s:%d", *server.sockets[0].getsockname())
    await server.serve_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    port, loop = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop == "uvloop":
        import uvloop  # only here: the stdlib loop's server does not carry it

        uvloop.run(main(port))
    else:
        asyncio.run(main(port))
