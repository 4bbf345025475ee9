"""The echoing client of an Autobahn fuzzingserver run (scripts/autobahn.sh).

    python3 autobahn_echo_client.py BASE_URL AGENT

Asks BASE_URL/getCaseCount for the number of cases, plays each one at
BASE_URL/runCase?case=N&agent=AGENT, sending back every message until the
server closes, then has BASE_URL/updateReports?agent=AGENT write the report.
Uses the `websockets` package (examples/python_upstream/requirements.txt),
without compression (no extension is ever negotiated through the broker)
and without a size limit (cases 9.* send up to 16 MiB).
"""

import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException


async def main(base, agent):
    async with connect(f"{base}/getCaseCount") as ws:
        count = int(await ws.recv())
    for case in range(1, count + 1):
        try:
            async with connect(
                f"{base}/runCase?case={case}&agent={agent}",
                max_size=None,
                compression=None,
            ) as ws:
                async for message in ws:
                    await ws.send(message)
        except (WebSocketException, OSError):
            # The case ended the connection on purpose, or the client
            # refused what it was sent: the report says which.
            pass
    async with connect(f"{base}/updateReports?agent={agent}") as ws:
        async for _ in ws:
            pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
