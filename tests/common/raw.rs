//! A raw-frame peer: a WebSocket endpoint on a plain `TcpStream` that
//! writes hand-made frames (close codes no endpoint may send, reserved
//! bits, bad close payloads) that no WebSocket library would produce, and
//! reads the broker's frames as they are on the wire (tungstenite's reader
//! rewrites some close codes).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{upgrade_request, within};

/// Which end of the connection the peer is: a client masks its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

pub struct RawPeer {
    tcp: TcpStream,
    role: Role,
}

/// A frame as read: the first header byte (FIN, RSV, opcode) and the
/// unmasked payload.
#[derive(Debug)]
pub struct RawFrame {
    pub first: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
}

/// What ended a wait for a close frame.
#[derive(Debug, PartialEq, Eq)]
pub enum CloseSeen {
    /// A close frame: its code (1005 for none) and raw reason.
    Close(u16, Vec<u8>),
    /// The connection ended first.
    Ended,
}

impl RawPeer {
    /// Opens a WebSocket to `path` at `addr` as a client and reads the
    /// broker's 101.
    pub async fn client(addr: SocketAddr, path: &str) -> RawPeer {
        Self::client_with(addr, path, "").await.0
    }

    /// The same with `extra` header lines in the request; also returns the
    /// 101's head.
    pub async fn client_with(addr: SocketAddr, path: &str, extra: &str) -> (RawPeer, String) {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(upgrade_request(addr, path, extra).as_bytes())
            .await
            .expect("write the upgrade request");
        let head = read_head(&mut tcp).await.expect("a response");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let peer = RawPeer {
            tcp,
            role: Role::Client,
        };
        (peer, head)
    }

    /// Accepts one connection on `listener` as a server and answers its
    /// upgrade with 101.
    pub async fn accept(listener: &TcpListener) -> RawPeer {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let reply = super::upstream::switching_protocols(&mut tcp)
            .await
            .expect("an upgrade request");
        tcp.write_all(&reply).await.expect("write 101");
        RawPeer {
            tcp,
            role: Role::Server,
        }
    }

    /// Writes one frame with header byte `first` and `payload` (under 126
    /// bytes), masked if the peer is a client.
    pub async fn write_frame(&mut self, first: u8, payload: &[u8]) {
        assert!(payload.len() < 126, "one short frame");
        let mut frame = vec![first, payload.len() as u8];
        match self.role {
            Role::Server => frame.extend_from_slice(payload),
            Role::Client => {
                let mask = [0x5a, 0x13, 0xc4, 0x7e];
                frame[1] |= 0x80;
                frame.extend(mask);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
        }
        self.tcp.write_all(&frame).await.expect("write a frame");
    }

    /// Writes `bytes` as they are (a frame cut short, say).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write");
    }

    /// The next frame, or `None` once the connection ends.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        let mut head = [0u8; 2];
        self.tcp.read_exact(&mut head).await.ok()?;
        let masked = head[1] & 0x80 != 0;
        assert_eq!(
            masked,
            self.role == Role::Server,
            "only frames toward a server are masked"
        );
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.tcp.read_exact(&mut b).await.ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.tcp.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        if masked {
            self.tcp.read_exact(&mut mask).await.ok()?;
        }
        let mut payload = vec![0u8; len as usize];
        self.tcp.read_exact(&mut payload).await.ok()?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        Some(RawFrame {
            first: head[0],
            payload,
        })
    }

    /// Reads frames until a close frame or the end of the connection.
    pub async fn next_close(&mut self) -> CloseSeen {
        within("a close frame or the end", async {
            while let Some(frame) = self.read_frame().await {
                if frame.opcode() == 0x8 {
                    let p = frame.payload;
                    return match p.len() {
                        0 => CloseSeen::Close(1005, Vec::new()),
                        _ => CloseSeen::Close(u16::from_be_bytes([p[0], p[1]]), p[2..].to_vec()),
                    };
                }
            }
            CloseSeen::Ended
        })
        .await
    }

    /// The close code of the next close frame; fails the test if the
    /// connection ends without one.
    pub async fn close_code(&mut self) -> u16 {
        match self.next_close().await {
            CloseSeen::Close(code, _) => code,
            CloseSeen::Ended => panic!("the connection ended without a close frame"),
        }
    }

    /// Reads until the other end closes the connection.
    pub async fn ended(&mut self) {
        within("the end of the connection", async {
            while self.read_frame().await.is_some() {}
        })
        .await
    }

    /// Shuts the connection down, as a server does after the close
    /// handshake.
    pub async fn shutdown(&mut self) {
        let _ = self.tcp.shutdown().await;
    }
}

/// Reads an HTTP head (through the blank line) and nothing behind it, so
/// that the frames behind it are left to [`RawPeer::read_frame`].
pub async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
