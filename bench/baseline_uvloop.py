"""Reference echo server: an asyncio Protocol on uvloop (`pip install uvloop`).

python bench/baseline_uvloop.py PORT      (0 = any free port)
"""

import asyncio
import logging
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop sets TCP_NODELAY on TCP transports itself

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
    uvloop.run(main(int(sys.argv[1])))
