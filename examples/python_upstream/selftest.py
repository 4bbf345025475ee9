#!/usr/bin/env python3
"""Self-test for upstream.py: starts it on port 0 and plays the broker.

The broker-side encoder/decoder below is written separately from upstream.py's
(on purpose: sharing code would hide a misreading of the protocol page).
Exit status 0 on success; on failure prints FAIL, the reason and the tail of
the upstream's stderr, and exits 1.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

HERE = Path(__file__).resolve().parent
TIMEOUT = 5.0
ZERO = bytes(16)


class TestFailure(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise TestFailure(what)


def ok(what: str) -> None:
    print(f"ok - {what}", flush=True)


# ---------------------------------------------------------------- broker codec
class BrokerCodec:
    """Broker side of one encoding: encode broker->upstream frames, decode
    upstream->broker frames into a dict {type, session, sessions, payload,
    code, reason}; payload is str for text and bytes for binary."""

    def __init__(self, proto: str) -> None:
        self.proto = proto
        self.binary = proto == "muxgate.v1.binary"

    def hello(self) -> str | bytes:
        obj = {"type": "hello", "version": 1, "broker": "selftest/0", "instance": str(uuid4()),
               "connection": str(uuid4())}
        return bytes([0]) + ZERO + json.dumps(obj).encode() if self.binary else json.dumps(obj)

    def open(self, sid: UUID, path: str, resumed: bool = False, **extra: Any) -> str | bytes:
        obj = {"route": "/ws" + path.split("?")[0], "path": path, "remote_addr": "203.0.113.9:5312",
               "headers": {"user-agent": "selftest"}, "subprotocols": [], "resumed": resumed, **extra}
        if self.binary:
            return bytes([1]) + sid.bytes + json.dumps(obj).encode()
        return json.dumps({"type": "open", "session": str(sid), **obj})

    def message(self, sid: UUID, payload: str | bytes) -> str | bytes:
        if self.binary:
            body = payload.encode() if isinstance(payload, str) else payload
            return bytes([2 if isinstance(payload, str) else 3]) + sid.bytes + body
        key, val = ("text", payload) if isinstance(payload, str) else ("binary", base64.b64encode(payload).decode())
        return json.dumps({"type": "message", "session": str(sid), key: val})

    def close(self, sid: UUID, code: int, reason: str) -> str | bytes:
        if self.binary:
            return bytes([4]) + sid.bytes + struct.pack(">H", code) + reason.encode()
        return json.dumps({"type": "close", "session": str(sid), "code": code, "reason": reason})

    def decode(self, raw: str | bytes) -> dict[str, Any]:
        if not self.binary:
            check(isinstance(raw, str), "JSON mux connection got a binary WebSocket frame")
            obj = json.loads(raw)
            out: dict[str, Any] = {"type": obj["type"]}
            if "session" in obj:
                out["session"] = UUID(obj["session"])
            if "sessions" in obj:
                out["sessions"] = [UUID(s) for s in obj["sessions"]]
            if "text" in obj:
                out["payload"] = obj["text"]
            if "binary" in obj:
                b64 = obj["binary"]
                check(base64.b64encode(base64.b64decode(b64, validate=True)).decode() == b64,
                      f"upstream base64 not standard/padded: {b64!r}")
                out["payload"] = base64.b64decode(b64)
            if obj["type"] == "close":
                out["code"], out["reason"] = obj["code"], obj["reason"]
            return out
        check(isinstance(raw, bytes), "binary mux connection got a text WebSocket frame")
        check(len(raw) >= 17, f"upstream sent a {len(raw)}-byte frame")
        t, sid, body = raw[0], UUID(bytes=raw[1:17]), raw[17:]
        if t in (2, 3):
            return {"type": "message", "session": sid, "payload": body.decode() if t == 2 else body}
        if t == 4:
            return {"type": "close", "session": sid, "code": struct.unpack(">H", body[:2])[0],
                    "reason": body[2:].decode()}
        if t in (5, 6):
            check(raw[1:17] == ZERO, "broadcast header id is not all zero")
            (n,) = struct.unpack(">I", body[:4])
            ids = [UUID(bytes=body[4 + 16 * i: 20 + 16 * i]) for i in range(n)]
            rest = body[4 + 16 * n:]
            return {"type": "broadcast", "sessions": ids, "payload": rest.decode() if t == 5 else rest}
        raise TestFailure(f"upstream sent unknown binary frame type {t}")


class Mux:
    """One mux connection as the broker sees it."""

    def __init__(self, ws: ClientConnection, codec: BrokerCodec) -> None:
        self.ws, self.c = ws, codec

    async def send(self, raw: str | bytes) -> None:
        await self.ws.send(raw)

    async def recv(self) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        except asyncio.TimeoutError:
            raise TestFailure("timed out waiting for a frame from the upstream") from None
        return self.c.decode(raw)

    async def expect_message(self, sid: UUID, payload: str | bytes, what: str) -> None:
        f = await self.recv()
        check(f == {"type": "message", "session": sid, "payload": payload},
              f"{what}: expected message {payload!r:.60} for {sid}, got {f!r:.300}")

    async def opened(self, sid: UUID, path: str) -> None:
        """Open a session and wait until the upstream has registered it (a
        whoami round trip): each connection is served concurrently, so a
        message on ANOTHER connection could otherwise overtake this open."""
        await self.send(self.c.open(sid, path))
        await self.send(self.c.message(sid, "whoami"))
        f = await self.recv()
        check(f["type"] == "message" and f["session"] == sid, f"whoami after open: {f!r:.300}")

    async def echo(self, sid: UUID, payload: str | bytes, what: str) -> None:
        await self.send(self.c.message(sid, payload))
        await self.expect_message(sid, payload, what)


async def mux(url: str, proto: str) -> Mux:
    ws = await connect(url, subprotocols=[proto], max_size=None)
    check(ws.subprotocol == proto, f"upstream selected {ws.subprotocol!r}, not {proto!r}")
    m = Mux(ws, BrokerCodec(proto))
    await m.send(m.c.hello())
    return m


# ------------------------------------------------------------------ scenarios
async def test_encoding(url: str, proto: str) -> None:
    c1 = await mux(url, proto)
    ok(f"[{proto}] subprotocol selected, hello sent")
    C = c1.c
    s_echo, s_chat1 = uuid4(), uuid4()
    await c1.send(C.open(s_echo, "/echo", subprotocols=["chat.v2"], claims={"sub": "alice"}))
    await c1.send(C.open(s_chat1, "/chat?room=1"))

    await c1.echo(s_echo, "hello, wörld ✓ 🎉", "text echo")
    await c1.echo(s_echo, bytes(range(256)), "binary echo of all byte values")
    await c1.echo(s_echo, "", "empty text echo")
    await c1.echo(s_echo, b"", "empty binary echo")
    for i in range(50):
        await c1.send(C.message(s_echo, f"n{i}"))
    for i in range(50):
        await c1.expect_message(s_echo, f"n{i}", "ordered echo")
    ok(f"[{proto}] echo: text, binary 0..255, empty text/binary, 50 in order")

    await c1.send(C.message(s_echo, "whoami"))
    f = await c1.recv()
    check(f["type"] == "message" and f["session"] == s_echo and isinstance(f["payload"], str), f"whoami: {f}")
    who = json.loads(f["payload"])
    want = {"session": str(s_echo), "path": "/echo", "route": "/ws/echo", "headers": {"user-agent": "selftest"},
            "subprotocols": ["chat.v2"], "claims": {"sub": "alice"}, "resumed": False}
    check(who == want, f"whoami: got {who}, want {want}")
    await c1.send(C.message(s_chat1, "whoami"))
    who = json.loads((await c1.recv())["payload"])
    check(who["claims"] is None and who["path"] == "/chat?room=1", f"whoami (chat, no claims): {who}")
    ok(f"[{proto}] whoami reflects the open frame (claims null when absent)")

    # Chat across two mux connections: each gets one broadcast listing its own chat sessions.
    c2 = await mux(url, proto)
    s_chat2 = uuid4()
    await c2.opened(s_chat2, "/chat?room=1")
    await c1.send(C.message(s_chat1, "hi room"))
    f1, f2 = await c1.recv(), await c2.recv()
    check(f1 == {"type": "broadcast", "sessions": [s_chat1], "payload": "hi room"}, f"chat on c1: {f1}")
    check(f2 == {"type": "broadcast", "sessions": [s_chat2], "payload": "hi room"}, f"chat on c2: {f2}")
    await c2.send(C.message(s_chat2, b"\x00\xffbin"))
    f1, f2 = await c1.recv(), await c2.recv()
    check(f1 == {"type": "broadcast", "sessions": [s_chat1], "payload": b"\x00\xffbin"}, f"bin chat c1: {f1}")
    check(f2 == {"type": "broadcast", "sessions": [s_chat2], "payload": b"\x00\xffbin"}, f"bin chat c2: {f2}")
    ok(f"[{proto}] chat broadcast (text and binary) reaches both sessions on two connections")

    # close:CODE:REASON, then the session is gone (its later frames are dropped).
    await c1.send(C.message(s_echo, "close:4001:bye"))
    f = await c1.recv()
    check(f == {"type": "close", "session": s_echo, "code": 4001, "reason": "bye"}, f"close command: {f}")
    s_tmp = uuid4()
    await c1.send(C.open(s_tmp, "/echo"))
    await c1.send(C.message(s_tmp, "close:1000:a:b"))
    f = await c1.recv()
    check(f == {"type": "close", "session": s_tmp, "code": 1000, "reason": "a:b"}, f"close w/ colons: {f}")
    s_probe = uuid4()
    await c1.send(C.message(s_echo, "after close"))
    await c1.send(C.open(s_probe, "/echo"))
    await c1.echo(s_probe, "probe1", "frame after upstream close must be dropped")
    ok(f"[{proto}] close:4001:bye -> close frame; session then forgotten")

    # Broker close: forget, no reply.
    await c1.send(C.close(s_probe, 1000, "client left"))
    await c1.send(C.message(s_probe, "gone"))
    s_probe2 = uuid4()
    await c1.send(C.open(s_probe2, "/echo"))
    await c1.echo(s_probe2, "probe2", "broker close must get no reply and forget the session")
    ok(f"[{proto}] broker close: no reply, session forgotten")

    # Resumed open re-binding a live session from c1 to c2.
    s_res = uuid4()
    await c1.send(C.open(s_res, "/echo"))
    await c1.echo(s_res, "one", "before resume")
    await c2.send(C.open(s_res, "/echo", resumed=True))
    await c2.echo(s_res, "two", "after resume on c2")
    await c1.send(C.message(s_res, "stale"))  # bound to c2 now: dropped
    await c1.echo(s_probe2, "probe3", "message on old connection after re-bind must be dropped")
    await c2.send(C.message(s_res, "whoami"))
    who = json.loads((await c2.recv())["payload"])
    check(who["resumed"] is True and who["session"] == str(s_res), f"whoami after resume: {who}")
    ok(f"[{proto}] resumed open re-binds a live session to the second connection")

    # Mux connection loss: c1 closes, its chat session is resumed on c2.
    await c1.ws.close()
    await c2.send(C.open(s_chat1, "/chat?room=1", resumed=True))
    await c2.send(C.message(s_chat2, "after resume"))
    f = await c2.recv()
    check(f["type"] == "broadcast" and f["payload"] == "after resume"
          and sorted(f["sessions"]) == sorted([s_chat1, s_chat2]), f"chat after resume: {f}")
    ok(f"[{proto}] after c1 closed, resumed chat session gets broadcasts on c2")

    # Malformed frames are skipped; the connection stays up and keeps order.
    sid, new = str(s_res), str(uuid4())
    if C.binary:
        bad: list[str | bytes] = [
            b"", b"\x02short", bytes([0x7F]) + s_res.bytes + b"x", bytes([2]) + s_res.bytes + b"\xff\xfe",
            bytes([0]) + ZERO + b"{not json", bytes([1]) + uuid4().bytes + b"{bad", bytes([1]) + uuid4().bytes
            + b"[1]", bytes([1]) + uuid4().bytes + b'{"route":"/x"}', bytes([4]) + s_res.bytes + b"\x03",
            bytes([4]) + s_res.bytes + b"\x03\xe8\xff", bytes([5]) + ZERO + struct.pack(">I", 0) + b"x",
            "text frame on binary conn", bytes([2]) + uuid4().bytes + b"unknown session",
        ]
    else:
        bad = [
            "not json {", "[1,2]", "null", json.dumps({"session": sid}), '{"type":"message","text":"x"}',
            '{"type":"message","session":"not-a-uuid","text":"x"}',
            json.dumps({"type": "message", "session": sid.upper(), "text": "upper-case id"}), json.dumps({"type": "bogus", "session": sid}),
            *(json.dumps({"type": "message", "session": sid, "binary": b}) for b in ("@@@@", "AAE", "AA-_", 5)),
            json.dumps({"type": "message", "session": sid, "text": "a", "binary": "AA=="}),
            json.dumps({"type": "message", "session": sid}), json.dumps({"type": "message", "session": sid, "text": 7}),
            '{"type":"message","session":"%s","text":"\\ud800"}' % sid,
            json.dumps({"type": "close", "session": sid}), json.dumps({"type": "open", "session": new}),
            b"binary frame on JSON conn", json.dumps({"type": "message", "session": new, "text": "unknown"}),
        ]
    for raw in bad:
        await c2.send(raw)
    await c2.echo(s_res, "still alive", "echo after malformed frames")
    ok(f"[{proto}] {len(bad)} malformed frames skipped, connection up, echo works")
    await c2.ws.close()


async def test_cross_encoding(url: str) -> None:
    j, b = await mux(url, "muxgate.v1.json"), await mux(url, "muxgate.v1.binary")
    sj, sb = uuid4(), uuid4()
    await j.opened(sj, "/chat")
    await b.opened(sb, "/chat/x")
    await b.send(b.c.message(sb, "mixed ✓"))
    fj, fb = await j.recv(), await b.recv()
    check(fj == {"type": "broadcast", "sessions": [sj], "payload": "mixed ✓"}, f"json side: {fj}")
    check(fb == {"type": "broadcast", "sessions": [sb], "payload": "mixed ✓"}, f"binary side: {fb}")
    ok("chat broadcast crosses a JSON and a binary mux connection")
    await j.ws.close()
    await b.ws.close()


async def test_plain_echo(url: str) -> None:
    for offered in (None, ["chat.v2"]):
        async with connect(url, subprotocols=offered) as ws:
            check(ws.subprotocol is None, f"plain: subprotocol {ws.subprotocol!r} selected")
            for msg in ("plain", b"\x00\x01\xff"):
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), TIMEOUT)
                check(got == msg, f"plain echo: sent {msg!r}, got {got!r}")
    ok("no mux subprotocol offered -> plain WebSocket echo")


async def run(stderr_path: Path) -> None:
    with open(stderr_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "upstream.py"), "--listen", "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        except asyncio.TimeoutError:
            raise TestFailure("no 'listening' line within 10 s") from None
        m = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)\n", line)
        check(m is not None and int(m.group(1)) != 0, f"bad listening line {line!r}")
        url = f"ws://127.0.0.1:{m.group(1)}/internal"
        ok(f"upstream printed {line.strip()!r}")

        for proto in ("muxgate.v1.json", "muxgate.v1.binary"):
            await test_encoding(url, proto)
        await test_cross_encoding(url)
        await test_plain_echo(url)

        # SIGTERM: open connections are closed with 1001, process exits 0.
        ws = await connect(url, subprotocols=["muxgate.v1.json"])
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            raise TestFailure("expected the connection to close on SIGTERM")
        except ConnectionClosed as exc:
            check(exc.rcvd is not None and exc.rcvd.code == 1001, f"SIGTERM close: {exc}")
        rc = await asyncio.wait_for(proc.wait(), 10)
        check(rc == 0, f"upstream exited {rc} after SIGTERM")
        rest = await proc.stdout.read()
        check(rest == b"", f"unexpected extra stdout: {rest!r}")
        ok("SIGTERM: connections closed with 1001, exit status 0, one stdout line")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = Path(tmp) / "upstream.stderr"
        try:
            asyncio.run(run(stderr_path))
        except (TestFailure, ConnectionClosed, asyncio.TimeoutError, OSError) as exc:
            print(f"FAIL: {type(exc).__name__}: {exc}", file=sys.stderr)
            tail = stderr_path.read_text(errors="replace").splitlines()[-40:] if stderr_path.exists() else []
            print("---- upstream stderr (last 40 lines) ----", *tail, sep="\n", file=sys.stderr)
            return 1
        skipped = stderr_path.read_text(errors="replace").count("malformed frame skipped")
        print(f"ok - upstream logged {skipped} malformed frames to stderr")
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
