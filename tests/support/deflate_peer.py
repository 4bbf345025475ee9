"""Both ends of a permessage-deflate session, with Python `websockets`
(an implementation independent of the broker's), for tests/compression.rs.

    deflate_peer.py serve [PORT] an echo server that accepts permessage-deflate
                                 (websockets' defaults) on PORT (default: any);
                                 prints its port
    deflate_peer.py client URL   connects with permessage-deflate offered,
                                 round-trips text and binary messages of every
                                 length class, byte-exact, then closes with
                                 1000; prints one JSON line: the extension the
                                 handshake agreed, and the messages echoed
"""

import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def run_server(port):
    async with serve(echo, "127.0.0.1", port, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.get_running_loop().create_future()


def messages():
    for length in [0, 1, 125, 126, 255, 256, 4096, 65535, 65536, 300_000]:
        # Compressible (JSON-like) and incompressible, as text and binary.
        chat = json.dumps({"room": 7, "text": "hello " * (length // 6 + 1)})[:length]
        yield chat
        yield os.urandom(length)
        yield chat.encode()
        yield os.urandom(length).hex()[:length]


async def run_client(url):
    async with connect(url, max_size=None) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        echoed = 0
        for message in messages():
            await ws.send(message)
            back = await ws.recv()
            if back != message:
                sys.exit(f"echo of a {type(message).__name__} of {len(message)} differs")
            echoed += 1
        await ws.close(1000, "done")
    print(json.dumps({"extensions": agreed, "echoed": echoed}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(run_server(int(sys.argv[2]) if len(sys.argv) > 2 else 0))
    else:
        asyncio.run(run_client(sys.argv[2]))
