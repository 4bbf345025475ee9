#!/usr/bin/env python3
"""Example muxgate upstream: the UPSTREAM side of the muxgate mux protocol v1.

Written from /work/shared/mux-protocol.md alone (not from the broker's code).
Sessions whose open.path starts with /chat form one chat room (messages go out
as `broadcast` frames), all other sessions get an echo. A few text commands
(`whoami`, `close:CODE:REASON`) make the broker-visible behaviour testable.
A client that offers neither mux subprotocol gets a plain WebSocket echo.

Usage: python3 upstream.py --listen HOST:PORT     (PORT may be 0)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import re
import signal
import socket
import struct
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

log = logging.getLogger("upstream")

JSON_PROTO = "muxgate.v1.json"
BINARY_PROTO = "muxgate.v1.binary"

# Binary encoding frame types (page section 4).
T_HELLO, T_OPEN, T_TEXT, T_BINARY, T_CLOSE, T_BCAST_TEXT, T_BCAST_BINARY = range(7)
HEADER_LEN = 17  # 1 type byte + 16 raw UUID bytes
ZERO_ID = bytes(16)  # session id field of hello and broadcast frames

Payload = str | bytes  # str = text message, bytes = binary message


class ProtocolError(Exception):
    """A malformed mux frame: logged and skipped, the connection stays up."""


@dataclass
class Frame:
    """One decoded broker->upstream frame, independent of the encoding."""

    type: str  # "hello" | "open" | "message" | "close"
    session: uuid.UUID | None = None
    info: dict[str, Any] = field(default_factory=dict)  # hello/open JSON object
    payload: Payload = ""  # message
    code: int = 0  # close
    reason: str = ""  # close


def utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")  # strict: invalid UTF-8 is malformed
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8: {exc}") from None


def json_object(text: str | bytes, what: str) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = utf8(text, what)
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


# --------------------------------------------------------------------------
# JSON encoding (muxgate.v1.json): one text WebSocket frame per mux frame.
# --------------------------------------------------------------------------
class JsonCodec:
    name = JSON_PROTO

    def decode(self, raw: str | bytes) -> Frame:
        if not isinstance(raw, str):
            raise ProtocolError("binary WebSocket frame on a JSON mux connection")
        obj = json_object(raw, "frame")
        ftype = obj.get("type")
        if not isinstance(ftype, str):
            raise ProtocolError("frame lacks a string 'type'")
        if ftype == "hello":
            return Frame("hello", info=obj)
        if ftype not in ("open", "message", "close"):
            # Unknown types are dropped for forward compatibility (section 3).
            raise ProtocolError(f"unknown frame type {ftype!r}")
        sid = obj.get("session")
        try:
            session = uuid.UUID(sid) if isinstance(sid, str) else None
        except ValueError:
            session = None
        # Only the page's form (hyphenated lowercase) is accepted, so every id
        # we send back is byte-identical to the one the broker sent.
        if session is None or str(session) != sid:
            raise ProtocolError(f"{ftype} frame lacks a hyphenated lowercase 'session' UUID")
        if ftype == "open":
            return Frame("open", session, info=obj)
        if ftype == "close":
            code, reason = obj.get("code"), obj.get("reason", "")
            # bool is an int subclass in Python; true/false is not a code.
            if type(code) is not int or not 0 <= code <= 0xFFFF or not isinstance(reason, str):
                raise ProtocolError("close frame needs an integer 'code' and a string 'reason'")
            return Frame("close", session, code=code, reason=reason)
        # message: exactly one of text / binary.
        if ("text" in obj) == ("binary" in obj):
            raise ProtocolError("message must carry exactly one of 'text' or 'binary'")
        if "text" in obj:
            text = obj["text"]
            if not isinstance(text, str):
                raise ProtocolError("'text' is not a string")
            try:
                text.encode("utf-8")  # JSON allows lone surrogates; UTF-8 doesn't
            except UnicodeEncodeError:
                raise ProtocolError("'text' is not valid Unicode") from None
            return Frame("message", session, payload=text)
        b64 = obj["binary"]
        try:
            # validate=True rejects non-alphabet chars (incl. URL-safe -_);
            # missing padding raises too, so only standard padded base64 passes.
            data = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            raise ProtocolError("'binary' is not standard padded base64")
        return Frame("message", session, payload=data)

    @staticmethod
    def _dump(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def _body(payload: Payload) -> dict[str, str]:
        if isinstance(payload, str):
            return {"text": payload}
        return {"binary": base64.b64encode(payload).decode("ascii")}

    def message(self, session: uuid.UUID, payload: Payload) -> str:
        return self._dump({"type": "message", "session": str(session), **self._body(payload)})

    def close(self, session: uuid.UUID, code: int, reason: str) -> str:
        return self._dump({"type": "close", "session": str(session), "code": code, "reason": reason})

    def broadcast(self, sessions: Sequence[uuid.UUID], payload: Payload) -> str:
        ids = [str(s) for s in sessions]
        return self._dump({"type": "broadcast", "sessions": ids, **self._body(payload)})


# --------------------------------------------------------------------------
# Binary encoding (muxgate.v1.binary): one binary WebSocket frame per mux frame.
# --------------------------------------------------------------------------
class BinaryCodec:
    name = BINARY_PROTO

    def decode(self, raw: str | bytes) -> Frame:
        if not isinstance(raw, bytes):
            raise ProtocolError("text WebSocket frame on a binary mux connection")
        if len(raw) < HEADER_LEN:
            raise ProtocolError(f"frame of {len(raw)} bytes is shorter than {HEADER_LEN}")
        ftype, session, body = raw[0], uuid.UUID(bytes=raw[1:HEADER_LEN]), raw[HEADER_LEN:]
        if ftype == T_HELLO:
            return Frame("hello", info=json_object(body, "hello payload"))
        if ftype == T_OPEN:
            return Frame("open", session, info=json_object(body, "open payload"))
        if ftype == T_TEXT:
            return Frame("message", session, payload=utf8(body, "text payload"))
        if ftype == T_BINARY:
            return Frame("message", session, payload=bytes(body))
        if ftype == T_CLOSE:
            if len(body) < 2:
                raise ProtocolError("close payload lacks its u16 code")
            code = struct.unpack(">H", body[:2])[0]
            return Frame("close", session, code=code, reason=utf8(body[2:], "close reason"))
        if ftype in (T_BCAST_TEXT, T_BCAST_BINARY):
            raise ProtocolError("broadcast is an upstream-to-broker frame only")
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}")

    def message(self, session: uuid.UUID, payload: Payload) -> bytes:
        if isinstance(payload, str):
            return bytes([T_TEXT]) + session.bytes + payload.encode("utf-8")
        return bytes([T_BINARY]) + session.bytes + payload

    def close(self, session: uuid.UUID, code: int, reason: str) -> bytes:
        return bytes([T_CLOSE]) + session.bytes + struct.pack(">H", code) + reason.encode("utf-8")

    def broadcast(self, sessions: Sequence[uuid.UUID], payload: Payload) -> bytes:
        # Never send count 0 by accident: on the wire it means "every session".
        assert sessions, "empty broadcast list"
        ftype, body = (
            (T_BCAST_TEXT, payload.encode("utf-8")) if isinstance(payload, str) else (T_BCAST_BINARY, payload)
        )
        ids = b"".join(s.bytes for s in sessions)
        return bytes([ftype]) + ZERO_ID + struct.pack(">I", len(sessions)) + ids + body


Codec = JsonCodec | BinaryCodec
CODECS: dict[str, Codec] = {JSON_PROTO: JsonCodec(), BINARY_PROTO: BinaryCodec()}


# --------------------------------------------------------------------------
# Session registry, shared by ALL mux connections so that chat broadcasts can
# reach sessions on every connection and a resumed open can re-bind a session.
# --------------------------------------------------------------------------
@dataclass(eq=False)  # identity equality: usable as a dict key
class MuxConn:
    ws: ServerConnection
    codec: Codec
    label: str  # for logs; becomes the broker's connection id after hello

    async def send(self, data: str | bytes) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            # Possibly another connection's handler writing here; the close is
            # handled by this connection's own handler, so just note it.
            log.info("conn=%s send after close dropped", self.label)


@dataclass
class Session:
    id: uuid.UUID
    conn: MuxConn
    open: dict[str, Any]  # most recent open frame's JSON object

    @property
    def chat(self) -> bool:
        path = self.open.get("path")
        return isinstance(path, str) and path.startswith("/chat")


SESSIONS: dict[uuid.UUID, Session] = {}
CLOSE_CMD = re.compile(r"close:(\d{1,5}):(.*)", re.DOTALL)


def bound_here(conn: MuxConn, sid: uuid.UUID) -> Session | None:
    """The session if it is bound to `conn`; frames for any other session id
    (unknown, already closed, or bound to another connection) are dropped."""
    sess = SESSIONS.get(sid)
    if sess is None or sess.conn is not conn:
        log.warning("conn=%s session=%s frame for a session not bound here dropped", conn.label, sid)
        return None
    return sess


async def on_message(conn: MuxConn, sess: Session, payload: Payload) -> None:
    if isinstance(payload, str):
        if payload == "whoami":
            o = sess.open
            info = {k: o.get(k) for k in ("path", "route", "headers", "subprotocols", "claims")}
            reply = {"session": str(sess.id), **info, "resumed": o.get("resumed", False)}
            await conn.send(conn.codec.message(sess.id, json.dumps(reply)))
            return
        m = CLOSE_CMD.fullmatch(payload)
        if m and int(m.group(1)) <= 0xFFFF:
            # The upstream ends the session: the broker forgets it too (2.3).
            code, reason = int(m.group(1)), m.group(2)
            log.info("conn=%s session=%s closing code=%d reason=%r", conn.label, sess.id, code, reason)
            del SESSIONS[sess.id]
            await conn.send(conn.codec.close(sess.id, code, reason))
            return
    if not sess.chat:
        await conn.send(conn.codec.message(sess.id, payload))
        return
    # Chat: one broadcast per mux connection listing that connection's chat
    # sessions (the broker skips ids bound to another connection, so each
    # connection must get its own list). Snapshot before awaiting any send.
    groups: dict[MuxConn, list[uuid.UUID]] = {}
    for other in SESSIONS.values():
        if other.chat:
            groups.setdefault(other.conn, []).append(other.id)
    for target, ids in groups.items():
        await target.send(target.codec.broadcast(ids, payload))


async def dispatch(conn: MuxConn, frame: Frame) -> None:
    if frame.type == "hello":
        conn.label = str(frame.info.get("connection", conn.label))
        if frame.info.get("version") != 1:
            log.warning("conn=%s hello with version %r, expected 1", conn.label, frame.info.get("version"))
        log.info("conn=%s hello from broker=%s instance=%s", conn.label,
                 frame.info.get("broker"), frame.info.get("instance"))
        return
    assert frame.session is not None
    sid = frame.session
    if frame.type == "open":
        path = frame.info.get("path")
        if not isinstance(path, str):
            raise ProtocolError("open lacks a string 'path'")
        old = SESSIONS.get(sid)
        resumed = frame.info.get("resumed") is True
        if old is not None and not resumed:
            log.warning("conn=%s session=%s opened again without resumed; replacing", conn.label, sid)
        # A resumed open re-binds a known session, or adopts one we forgot
        # when its old mux connection closed.
        SESSIONS[sid] = Session(sid, conn, frame.info)
        log.info("conn=%s session=%s open path=%s resumed=%s", conn.label, sid, path, resumed)
    elif frame.type == "message":
        if (sess := bound_here(conn, sid)) is not None:
            await on_message(conn, sess, frame.payload)
    elif frame.type == "close":
        if bound_here(conn, sid) is not None:
            del SESSIONS[sid]  # never answer the broker's close with a close
            log.info("conn=%s session=%s closed by broker code=%d reason=%r",
                     conn.label, sid, frame.code, frame.reason)


async def handler(ws: ServerConnection) -> None:
    if ws.subprotocol is None:
        # No mux subprotocol offered: plain echo, handy for health checks.
        log.info("plain echo connection from %s", ws.remote_address)
        try:
            async for msg in ws:
                await ws.send(msg)
        except ConnectionClosed:
            pass
        return
    conn = MuxConn(ws, CODECS[ws.subprotocol], f"{ws.remote_address}")
    log.info("conn=%s mux connection, %s", conn.label, ws.subprotocol)
    try:
        async for raw in ws:
            try:
                await dispatch(conn, conn.codec.decode(raw))
            except ProtocolError as exc:
                log.warning("conn=%s malformed frame skipped: %s", conn.label, exc)
    except ConnectionClosed:
        pass  # abnormal close: clean up below like a normal one
    finally:
        # Forget this connection's sessions; the broker may resume them on
        # another connection with an open carrying "resumed": true.
        gone = [s.id for s in SESSIONS.values() if s.conn is conn]
        for sid in gone:
            del SESSIONS[sid]
        log.info("conn=%s closed, forgot %d session(s)", conn.label, len(gone))


def select_subprotocol(_ws: ServerConnection, offered: Sequence[str]) -> str | None:
    # Pick the first mux subprotocol the broker offers (it offers exactly one);
    # None (instead of the library's default HTTP 400) means plain echo.
    return next((p for p in offered if p in CODECS), None)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, type=parse_listen, metavar="HOST:PORT")
    host, port = ap.parse_args().listen

    # Bind one address only: with a name like "localhost" and port 0, asyncio
    # would bind IPv4 and IPv6 on two *different* random ports.
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    # max_size=None: the broker already enforces max_message_size on clients.
    async with serve(handler, addr[0], port, family=family,
                     select_subprotocol=select_subprotocol, max_size=None) as server:
        bound = server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening {shown}:{bound}", flush=True)
        await stop
        log.info("shutting down")
    # Leaving `async with` closes every connection with 1001 (going away).


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    asyncio.run(main())
