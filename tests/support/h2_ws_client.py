"""WebSockets over HTTP/2 (RFC 8441) from Python: PyPI's `h2` for the
HTTP/2 connection and `wsproto` for the WebSocket frames, written from the
RFCs, not from muxgate's code.

Opens one HTTP/2 connection (prior knowledge, cleartext) to HOST:PORT,
waits for the server's SETTINGS to allow extended CONNECT, then opens one
WebSocket per --path on it, all at once, and on each: echoes text and
binary messages of every length class byte-exact, then closes with
4001 "bye" and expects the same close back. With --upstream-close, a
further stream per path asks the echo upstream to close
(`close:4002:done`) and expects that code. Prints one JSON line with what
each stream saw; exits non-zero on the first mismatch.

    python3 h2_ws_client.py 127.0.0.1:8080 --path /ws/echo --path /ws/chat
"""

import argparse
import json
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20]


class Failed(Exception):
    pass


class H2WebSockets:
    """One HTTP/2 connection carrying WebSockets, each a wsproto Connection
    fed by its stream's DATA."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}"
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 << 20)
        self.flush()
        self.ws = {}  # stream id -> wsproto Connection
        self.inbox = {}  # stream id -> list of wsproto events
        self.heads = {}  # stream id -> response headers
        self.ended = set()
        self.connect_allowed = False
        while not self.connect_allowed:
            self.pump()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self):
        """Reads once and dispatches what arrived."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise Failed("the broker closed the connection")
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                setting = event.changed_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
                if setting is not None and setting.new_value == 1:
                    self.connect_allowed = True
            elif isinstance(event, h2.events.ResponseReceived):
                self.heads[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                ws = self.ws.get(event.stream_id)
                if ws is not None and event.data:
                    if ws.state == ConnectionState.CLOSED:
                        raise Failed(f"stream {event.stream_id}: data after the close")
                    ws.receive_data(event.data)
                    for ws_event in ws.events():
                        if isinstance(ws_event, Ping):
                            self.send_ws(event.stream_id, ws_event.response())
                        else:
                            self.inbox[event.stream_id].append(ws_event)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.ended.add(event.stream_id)
        self.flush()

    def open(self, path):
        if not self.h2.remote_settings.enable_connect_protocol:
            raise Failed("SETTINGS_ENABLE_CONNECT_PROTOCOL is not 1")
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream,
            [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":path", path),
                (":authority", self.authority),
                ("sec-websocket-version", "13"),
            ],
        )
        self.flush()
        self.ws[stream] = Connection(ConnectionType.CLIENT)
        self.inbox[stream] = []
        return stream

    def answered(self, stream):
        while stream not in self.heads:
            self.pump()
        head = self.heads[stream]
        if head.get(":status") != "200":
            raise Failed(f"stream {stream}: status {head.get(':status')}")
        if "sec-websocket-accept" in head:
            raise Failed("a 200 to an extended CONNECT carries no Sec-WebSocket-Accept")
        return head

    def send_ws(self, stream, event):
        data = self.ws[stream].send(event)
        while data:
            room = min(
                self.h2.local_flow_control_window(stream),
                self.h2.max_outbound_frame_size,
            )
            if room <= 0:
                self.flush()
                self.pump()  # WINDOW_UPDATE
                continue
            self.h2.send_data(stream, data[:room])
            data = data[room:]
            self.flush()

    def next_event(self, stream):
        while not self.inbox[stream]:
            if stream in self.ended:
                raise Failed(f"stream {stream} ended")
            self.pump()
        return self.inbox[stream].pop(0)

    def next_message(self, stream):
        """A whole message (wsproto may hand it over in parts)."""
        parts = []
        while True:
            event = self.next_event(stream)
            if isinstance(event, CloseConnection):
                return event
            if not isinstance(event, Message):
                raise Failed(f"unexpected {event!r}")
            parts.append(event.data)
            if event.message_finished:
                kind = TextMessage if isinstance(event, TextMessage) else BytesMessage
                joined = "".join(parts) if kind is TextMessage else b"".join(parts)
                return kind(data=joined)

    def end_stream(self, stream):
        """Ends our side once the close handshake is done; the broker may
        have ended the whole stream first (its END_STREAM, then
        RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        if stream not in self.ended:
            try:
                self.h2.end_stream(stream)
                self.flush()
            except h2.exceptions.StreamClosedError:
                pass
        self.wait_end(stream)

    def wait_end(self, stream):
        while stream not in self.ended:
            self.pump()


def echo_all(conn, streams):
    """Every size, text and binary, on every stream in turn."""
    for size in SIZES:
        binary = bytes((i * 31) % 251 for i in range(size))
        text = "".join(chr(ord("a") + i % 26) for i in range(size))
        for stream in streams:
            for message in (BytesMessage(data=binary), TextMessage(data=text)):
                conn.send_ws(stream, message)
        for stream in streams:
            for want in (binary, text):
                got = conn.next_message(stream)
                if not isinstance(got, Message) or got.data != want:
                    raise Failed(f"stream {stream}: echo of {len(want)} differs")
    multi = "héllo wörld ✓ 🚀"
    for stream in streams:
        conn.send_ws(stream, TextMessage(data=multi))
        got = conn.next_message(stream)
        if got.data != multi:
            raise Failed(f"stream {stream}: {got.data!r}")


def close_from_client(conn, stream):
    conn.send_ws(stream, CloseConnection(code=4001, reason="bye"))
    got = conn.next_event(stream)
    if not isinstance(got, CloseConnection) or (got.code, got.reason) != (4001, "bye"):
        raise Failed(f"stream {stream}: close answered with {got!r}")
    conn.end_stream(stream)
    return got.code


def close_from_upstream(conn, stream):
    conn.send_ws(stream, TextMessage(data="close:4002:done"))
    got = conn.next_event(stream)
    if not isinstance(got, CloseConnection) or got.code != 4002:
        raise Failed(f"stream {stream}: expected the upstream's 4002, got {got!r}")
    conn.send_ws(stream, got.response())
    conn.end_stream(stream)
    return got.code


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--path", action="append", required=True)
    parser.add_argument("--upstream-close", action="append", default=[])
    args = parser.parse_args()
    host, port = args.address.rsplit(":", 1)
    conn = H2WebSockets(host, int(port))
    streams = [conn.open(path) for path in args.path]
    for stream in streams:
        conn.answered(stream)
    echo_all(conn, streams)
    report = {"streams": len(streams), "paths": args.path, "sizes": SIZES, "closes": []}
    for path, stream in zip(args.path, streams):
        report["closes"].append({"path": path, "by": "client", "code": close_from_client(conn, stream)})
    for path in args.upstream_close:
        stream = conn.open(path)
        conn.answered(stream)
        report["closes"].append({"path": path, "by": "upstream", "code": close_from_upstream(conn, stream)})
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
