"""Reference echo server: an asyncio Protocol on the standard library's event loop.

python bench/baseline_asyncio.py PORT      (0 = any free port)
"""

import asyncio
import logging
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP transports itself

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
    asyncio.run(main(int(sys.argv[1])))
