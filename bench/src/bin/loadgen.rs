//! `loadgen`: WebSocket load for benchmarks.
//!
//! - `loadgen echo --url URL -c 100 --size 64 --duration 10s`: each
//!   connection keeps one message in flight and waits for its echo; prints
//!   round trips per second and latency percentiles. `--http2` runs the
//!   WebSockets as streams of HTTP/2 connections instead (RFC 8441),
//!   `--streams-per-connection` (100) on each.
//! - `loadgen latency --url URL -c 100 --size 64 --rate 5000 --duration 10s`:
//!   open loop at a fixed total rate; each message's latency counts from the
//!   instant it was scheduled, not the instant it was sent, so a stall delays
//!   the clock of every message behind it (no coordinated omission). Prints
//!   the achieved rate and latency percentiles. `--chat` sends chat JSON
//!   as text instead of binary filler, `--deflate` offers permessage-deflate.
//! - `loadgen idle --url URL -c 1000 --hold 30s`: opens the connections,
//!   prints `open N` once all are up, holds them, then closes them.
//!   `--http2` opens them as streams of HTTP/2 connections instead (RFC
//!   8441), `--streams-per-connection` (100) on each.
//! - `loadgen codec --states 50 --size 1024`: permessage-deflate's codec
//!   alone, no sockets: time per message to compress and to inflate.
//!
//! Connections are spread over source addresses 127.0.0.1-127.0.0.254 so a
//! run is not limited by one address's ephemeral ports.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use muxgate_backend::deflate::negotiate;
use muxgate_backend::deflate::stream::{DeflateSettings, Deflating};
use muxgate_backend::h2ws::{Connection, Stream, Windows};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Words that chat lines are made of.
const WORDS: [&str; 64] = [
    "hello", "everyone", "anyone", "seen", "the", "new", "build", "it", "works", "for", "me",
    "now", "thanks", "deploy", "is", "done", "lunch", "at", "noon", "meeting", "moved", "to",
    "three", "can", "you", "review", "my", "change", "please", "looks", "good", "ship", "when",
    "ready", "tests", "are", "green", "again", "who", "broke", "main", "sorry", "fixing", "that",
    "in", "a", "minute", "coffee", "anybody", "release", "notes", "tomorrow", "morning", "ok",
    "sounds", "great", "see", "you", "later", "on", "call", "brb", "back", "yes",
];

/// `len` bytes of chat JSON, lines of the kind a chat client sends (room,
/// user, id, time and a few words, all varying), different for every
/// `seed`: what compression is for. ASCII, so any cut is valid text.
fn chat_json(len: usize, seed: u64) -> String {
    // xorshift64*: varied, and the same for the same seed on every run.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = String::with_capacity(len + 256);
    while out.len() < len {
        let r = next();
        let words: Vec<&str> = (0..4 + r % 12)
            .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
            .collect();
        out.push_str(&format!(
            "{{\"type\":\"message\",\"room\":\"room-{}\",\"user\":\"user-{}\",\"id\":{},\"sent\":{},\"text\":\"{}\"}}\n",
            (r >> 8) % 8,
            (r >> 16) % 500,
            next() % 1_000_000_000,
            1_764_800_000_000 + next() % 100_000_000,
            words.join(" ")
        ));
    }
    out.truncate(len);
    out
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Round trips with one message in flight per connection.
    Echo {
        #[arg(long)]
        url: String,
        #[arg(short, long, default_value_t = 100)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        warmup: Duration,
        /// Extra handshake header, `Name: value` (repeatable; HTTP/1.1
        /// only).
        #[arg(long = "header", conflicts_with = "http2")]
        headers: Vec<String>,
        #[command(flatten)]
        http2: Http2Args,
    },
    /// Echo at a fixed total rate, spread evenly over the connections.
    Latency {
        #[arg(long)]
        url: String,
        #[arg(short, long, default_value_t = 100)]
        connections: usize,
        /// Message size in bytes; the first 8 carry the scheduled send time.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..))]
        size: u32,
        /// Messages per second over all connections together.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        warmup: Duration,
        /// Send chat JSON as text messages (the send time in their first 16
        /// characters, hex), each different: what compression is for.
        #[arg(long)]
        chat: bool,
        /// Offer permessage-deflate (the server must agree).
        #[arg(long)]
        deflate: bool,
    },
    /// Short sessions at a steady rate: open, one echo, close. Prints one
    /// line per second: opened, failed.
    Churn {
        #[arg(long)]
        url: String,
        /// New sessions per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
    },
    /// permessage-deflate's codec alone, no sockets: compresses and
    /// inflates `messages` chat-JSON messages of `size` bytes, spread in
    /// turn over `states` sessions' compressors and inflaters (context
    /// takeover, window 15, level 1: the broker's defaults); prints the
    /// time per message of each and the compressed share.
    Codec {
        #[arg(long, default_value_t = 50)]
        states: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
    },
    /// Open connections and hold them idle.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(short, long, default_value_t = 1000)]
        connections: usize,
        /// First source address offset (127.0.0.N).
        #[arg(long, default_value_t = 1)]
        source_offset: u8,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        hold: Duration,
        /// Offer permessage-deflate (the server must agree; HTTP/1.1 only:
        /// it is not offered over HTTP/2 here).
        #[arg(long, conflicts_with = "http2")]
        deflate: bool,
        /// Send one message of this many bytes of chat JSON on each
        /// connection and read its echo before holding it idle (0: none),
        /// so that a compressing server has made its compression states.
        #[arg(long, default_value_t = 0)]
        warm: usize,
        #[command(flatten)]
        http2: Http2Args,
    },
}

/// `--http2` and `--streams-per-connection`, of `echo` and `idle`.
#[derive(clap::Args)]
struct Http2Args {
    /// Open the WebSockets as streams of HTTP/2 connections (RFC 8441:
    /// prior-knowledge h2c, one extended CONNECT each) instead of one
    /// HTTP/1.1 connection each, so that a benchmark sees what a
    /// session costs the server when it shares its client connection.
    #[arg(long)]
    http2: bool,
    /// With `--http2`: the most WebSockets on one HTTP/2 connection.
    /// The connections are ceil(connections / this), the WebSockets
    /// spread evenly over them; the server must allow that many streams
    /// (`server.http2_max_concurrent_streams`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    streams_per_connection: u32,
}

impl Http2Args {
    /// WebSockets per HTTP/2 connection with `--http2`; none without.
    fn streams(&self) -> Option<usize> {
        self.http2.then_some(self.streams_per_connection as usize)
    }
}

/// The address and the path (`/` when none) of a `ws://IP:PORT/path` URL.
fn split_url(url: &str) -> (SocketAddr, &str) {
    let rest = url.strip_prefix("ws://").expect("ws:// URL");
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    (authority.parse().expect("IP:PORT in URL"), path)
}

/// A TCP connection (no Nagle) to `addr` from 127.0.0.`source` (0 counts
/// as 1), so that many of them are not limited by one source address's
/// ephemeral ports.
async fn connect_from(addr: SocketAddr, source: u8) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((
            Ipv4Addr::new(127, 0, 0, source.max(1)),
            0,
        )))
        .expect("bind source address");
    let tcp = socket.connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tcp
}

/// A client socket; with permessage-deflate when `--deflate` asked
/// and the server agreed (a pass-through otherwise).
type Ws = WebSocketStream<Deflating<TcpStream>>;

/// Connects from 127.0.0.`source` to the `ws://host:port/path` in `url`,
/// with extra handshake headers (`Name: value`).
async fn open_with(url: &str, source: u8, headers: &[String]) -> Ws {
    open_deflate(url, source, headers, false).await
}

/// [`open_with`], offering permessage-deflate when `deflate` (full
/// windows, context takeover unless the server says otherwise); panics if
/// the server does not agree to it.
async fn open_deflate(url: &str, source: u8, headers: &[String], deflate: bool) -> Ws {
    let (addr, _) = split_url(url);
    let tcp = connect_from(addr, source).await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for h in headers {
        let (name, value) = h.split_once(':').expect("--header 'Name: value'");
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.trim().as_bytes())
                .expect("header name"),
            value.trim().parse().expect("header value"),
        );
    }
    let offers = if deflate {
        let offer = negotiate::Params::default();
        request.headers_mut().insert(
            "sec-websocket-extensions",
            negotiate::offers_header(std::slice::from_ref(&offer)).expect("an offer"),
        );
        vec![offer]
    } else {
        Vec::new()
    };
    let (mut ws, response) = tokio_tungstenite::client_async(request, Deflating::plain(tcp))
        .await
        .expect("WebSocket handshake");
    if deflate {
        let agreed = negotiate::check_answer(response.headers(), &offers)
            .expect("a valid permessage-deflate answer")
            .expect("the server agreed permessage-deflate");
        let settings = DeflateSettings {
            agreed,
            level: 1,
            min_size: 0,
            max_decompressed_size: 64 << 20,
        };
        ws.get_mut().enable(Role::Client, settings, Box::new(()));
    }
    ws
}

#[tokio::main]
async fn main() {
    match Cli::parse().mode {
        Mode::Echo {
            url,
            connections,
            size,
            duration,
            warmup,
            headers,
            http2,
        } => {
            let test = EchoTest {
                size,
                duration,
                warmup,
            };
            match http2.streams() {
                None => {
                    let mut sockets = Vec::with_capacity(connections);
                    for i in 0..connections {
                        sockets.push(open_with(&url, (i % 254) as u8 + 1, &headers).await);
                    }
                    echo(sockets, test).await
                }
                Some(per) => {
                    let (_h2s, sockets) = open_http2(&url, connections, per, 1, ECHO_WINDOWS).await;
                    echo(sockets, test).await
                }
            }
        }
        Mode::Latency {
            url,
            connections,
            size,
            rate,
            duration,
            warmup,
            chat,
            deflate,
        } => {
            let schedule = Schedule {
                interval: Duration::from_secs_f64(1.0 / f64::from(rate)),
                warmup,
                duration,
            };
            let payload = if chat {
                assert!(size >= 16, "--chat needs --size 16 or more");
                Payload::Chat
            } else {
                Payload::Filler
            };
            let sockets = Sockets {
                connections,
                deflate,
            };
            latency(url, sockets, size as usize, payload, schedule).await
        }
        Mode::Idle {
            url,
            connections,
            source_offset,
            hold,
            deflate,
            warm,
            http2,
        } => match http2.streams() {
            Some(per) => idle_http2(url, connections, per, source_offset, hold, warm).await,
            None => idle(url, connections, source_offset, hold, deflate, warm).await,
        },
        Mode::Churn {
            url,
            rate,
            duration,
        } => churn(url, rate, duration).await,
        Mode::Codec {
            states,
            size,
            messages,
        } => codec(states.max(1), size, messages),
    }
}

fn codec(states: usize, size: usize, messages: usize) {
    use muxgate_backend::deflate::codec::{Deflater, Inflated, Inflater, READ_PIECE};
    // A session's messages differ as those of `latency --chat` do.
    let bodies: Vec<Vec<String>> = (0..states as u64).map(|s| chat_messages(size, s)).collect();
    let mut deflaters: Vec<Deflater> = (0..states)
        .map(|_| Deflater::new(1, 15, false).expect("valid"))
        .collect();
    let mut inflaters: Vec<Inflater> = (0..states)
        .map(|_| Inflater::new(15, false, 64 << 20).expect("valid"))
        .collect();
    let (mut deflating, mut inflating) = (Duration::ZERO, Duration::ZERO);
    let (mut plain, mut packed) = (0u64, 0u64);
    let mut out = vec![0u8; READ_PIECE];
    for k in 0..messages {
        let (session, turn) = (k % states, (k / states) as u64 % CHAT_MESSAGES);
        let body = &bodies[session][turn as usize];
        let started = Instant::now();
        let mut compressed = Vec::new();
        deflaters[session]
            .compress(body.as_bytes(), &mut compressed)
            .expect("deflate");
        deflating += started.elapsed();
        plain += body.len() as u64;
        packed += compressed.len() as u64;
        let started = Instant::now();
        let inflater = &mut inflaters[session];
        inflater.push_frame(Bytes::from(compressed), true);
        let mut inflated = 0;
        loop {
            match inflater.read(&mut out).expect("inflate") {
                Inflated::Bytes(n) => inflated += n,
                Inflated::MessageEnd => break,
                Inflated::NeedFrame => panic!("one frame per message"),
            }
        }
        inflating += started.elapsed();
        assert_eq!(inflated, body.len());
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / messages.max(1) as f64;
    println!(
        "states={states} size={size} messages={messages} deflate_us={:.2} inflate_us={:.2} compressed_percent={:.1}",
        per(deflating),
        per(inflating),
        100.0 * packed as f64 / plain.max(1) as f64
    );
}

async fn churn(url: String, rate: u32, duration: Duration) {
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_report = Duration::from_secs(1);
    while started.elapsed() < duration {
        ticks.tick().await;
        let (url, ok_n, failed_n) = (url.clone(), Arc::clone(&ok), Arc::clone(&failed));
        tasks.spawn(async move {
            let result = async {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.ok()?;
                ws.send(Message::text("churn")).await.ok()?;
                ws.next().await?.ok()?;
                let _ = ws.close(None).await;
                Some(())
            }
            .await;
            let counter = if result.is_some() { ok_n } else { failed_n };
            counter.fetch_add(1, Ordering::Relaxed);
        });
        if started.elapsed() >= next_report {
            println!(
                "t={}s opened={} failed={}",
                next_report.as_secs(),
                ok.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            );
            next_report += Duration::from_secs(1);
        }
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "total opened={} failed={}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}

/// What an `echo` run sends and for how long.
#[derive(Clone, Copy)]
struct EchoTest {
    size: usize,
    duration: Duration,
    warmup: Duration,
}

/// `echo` on open sockets (HTTP/1.1 connections or HTTP/2 streams alike):
/// each keeps one message in flight, the round trips of `test.duration`
/// after `test.warmup` counted.
async fn echo<S>(sockets: Vec<WebSocketStream<S>>, test: EchoTest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let EchoTest {
        size,
        duration,
        warmup,
    } = test;
    let connections = sockets.len();
    let payload = Bytes::from(vec![b'x'; size]);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let payload = payload.clone();
        let measuring = Arc::clone(&measuring);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                ws.send(Message::Binary(payload.clone()))
                    .await
                    .expect("send");
                loop {
                    match ws.next().await.expect("open").expect("read") {
                        Message::Binary(b) => {
                            assert_eq!(b.len(), payload.len());
                            break;
                        }
                        _ => continue,
                    }
                }
                if measuring.load(Ordering::Relaxed) {
                    count += 1;
                    let _ = hist.record(sent.elapsed().as_micros() as u64);
                }
            }
            let _ = ws.close(None).await;
            (count, hist)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        let (count, h) = t.await.expect("connection task");
        total += count;
        hist.add(h).unwrap();
    }
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "round_trips_per_sec={rate:.0} total={total} connections={connections} size={size} p50_us={} p99_us={} p999_us={}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    );
}

/// When each message of a fixed-rate run is due: message `j` (counted over
/// all connections) at `j * interval` after the start, on connection
/// `j % connections`. Messages due in the warm-up are sent but not counted.
#[derive(Clone, Copy)]
struct Schedule {
    interval: Duration,
    warmup: Duration,
    duration: Duration,
}

impl Schedule {
    fn messages(&self) -> u64 {
        ((self.warmup + self.duration).as_nanos() / self.interval.as_nanos().max(1)) as u64
    }

    fn due(&self, message: u64) -> Duration {
        Duration::from_nanos(self.interval.as_nanos() as u64 * message)
    }

    fn measured(&self, due: Duration) -> bool {
        due >= self.warmup && due < self.warmup + self.duration
    }
}

/// What one connection's reader saw in a fixed-rate run.
struct Received {
    /// Latency from the scheduled send time, for messages due in the window.
    hist: Histogram<u64>,
    /// Echoes that arrived inside the measured window (for the achieved rate).
    arrived_in_window: u64,
    /// Echoes received at all.
    total: u64,
}

/// What a fixed-rate run sends: binary filler, or chat JSON as text.
#[derive(Clone, Copy)]
enum Payload {
    Filler,
    Chat,
}

/// Distinct chat messages each connection sends in turn: 64 of 1 KiB are
/// twice a full deflate window, so no message repeats within one.
const CHAT_MESSAGES: u64 = 64;

/// The [`CHAT_MESSAGES`] chat-JSON messages of `size` bytes that session
/// `session` sends in turn, different from every other session's.
fn chat_messages(size: usize, session: u64) -> Vec<String> {
    (0..CHAT_MESSAGES)
        .map(|j| chat_json(size, session * CHAT_MESSAGES + j))
        .collect()
}

impl Payload {
    /// What connection `connection` sends in turn: its chat messages, or
    /// none (filler is made per message).
    fn bodies(self, size: usize, connection: u64) -> Vec<String> {
        match self {
            Payload::Filler => Vec::new(),
            Payload::Chat => chat_messages(size, connection),
        }
    }

    /// The `k`-th message of `size` bytes of a connection whose
    /// [`Payload::bodies`] are `bodies`, carrying `due` (nanoseconds after
    /// the start).
    fn message(self, size: usize, bodies: &[String], k: u64, due: u64) -> Message {
        match self {
            Payload::Filler => {
                let mut payload = vec![b'x'; size];
                payload[..8].copy_from_slice(&due.to_le_bytes());
                Message::Binary(Bytes::from(payload))
            }
            Payload::Chat => {
                let body = &bodies[(k % CHAT_MESSAGES) as usize];
                Message::text(format!("{due:016x}{}", &body[16..]))
            }
        }
    }

    /// The due time an echo carries.
    fn due(message: &Message) -> Option<u64> {
        match message {
            Message::Binary(b) => Some(u64::from_le_bytes(b[..8].try_into().ok()?)),
            Message::Text(t) => u64::from_str_radix(t.as_str().get(..16)?, 16).ok(),
            _ => None,
        }
    }
}

/// The sockets of a fixed-rate run.
struct Sockets {
    connections: usize,
    deflate: bool,
}

async fn latency(url: String, sockets: Sockets, size: usize, payload: Payload, schedule: Schedule) {
    let Sockets {
        connections,
        deflate,
    } = sockets;
    let connections = connections.max(1);
    let mut sockets = Vec::with_capacity(connections);
    for i in 0..connections {
        sockets.push(open_deflate(&url, (i % 254) as u8 + 1, &[], deflate).await);
    }
    let messages = schedule.messages();
    let start = Instant::now();
    let (mut due_txs, mut writers, mut readers) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ws) in sockets.into_iter().enumerate() {
        let (mut sink, stream) = ws.split();
        // Deep enough that the pacer only waits when the socket itself is
        // stuck, and then the wait counts: latency runs from the due time.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Duration>(4096);
        due_txs.push(tx);
        writers.push(tokio::spawn(async move {
            let (bodies, mut k) = (payload.bodies(size, i as u64), 0);
            while let Some(due) = rx.recv().await {
                let due = due.as_nanos() as u64;
                let message = payload.message(size, &bodies, k, due);
                k += 1;
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            sink
        }));
        let expected =
            messages / connections as u64 + u64::from((i as u64) < messages % connections as u64);
        readers.push(tokio::spawn(read_echoes(stream, start, schedule, expected)));
    }
    // A thread of its own paces the sends: tokio's timers tick in whole
    // milliseconds, which would add up to 1 ms to every measured latency;
    // a thread sleep wakes within tens of microseconds.
    let pacer = std::thread::spawn(move || {
        for message in 0..messages {
            let due = schedule.due(message);
            let wait = (start + due).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if due_txs[(message % connections as u64) as usize]
                .blocking_send(due)
                .is_err()
            {
                break;
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut arrived_in_window, mut received) = (0u64, 0u64);
    let mut streams = Vec::with_capacity(connections);
    for reader in readers {
        let (stream, r) = reader.await.expect("reader task");
        hist.add(r.hist).unwrap();
        arrived_in_window += r.arrived_in_window;
        received += r.total;
        streams.push(stream);
    }
    pacer.join().expect("pacer thread");
    for (writer, stream) in writers.into_iter().zip(streams) {
        let sink = writer.await.expect("writer task");
        if let Ok(mut ws) = stream.reunite(sink) {
            let _ = ws.close(None).await;
        }
    }
    let achieved = arrived_in_window as f64 / schedule.duration.as_secs_f64();
    let target = 1.0 / schedule.interval.as_secs_f64();
    println!(
        "target_per_sec={target:.0} achieved_per_sec={achieved:.0} sent={messages} measured={} lost={} connections={connections} size={size} p50_us={} p99_us={} p999_us={} max_us={}",
        hist.len(),
        messages - received,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
}

/// Reads one connection's `expected` echoes, each carrying its due time in
/// its first 8 bytes; gives up 5 s after the last one was due (those count
/// as lost).
async fn read_echoes(
    mut stream: futures_util::stream::SplitStream<Ws>,
    start: Instant,
    schedule: Schedule,
    expected: u64,
) -> (futures_util::stream::SplitStream<Ws>, Received) {
    let window = (start + schedule.warmup)..(start + schedule.warmup + schedule.duration);
    let give_up = tokio::time::Instant::from_std(window.end + Duration::from_secs(5));
    let mut r = Received {
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
        arrived_in_window: 0,
        total: 0,
    };
    while r.total < expected {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(give_up, stream.next()).await else {
            break;
        };
        let Some(due) = Payload::due(&message) else {
            continue;
        };
        let now = Instant::now();
        let due = Duration::from_nanos(due);
        r.total += 1;
        if window.contains(&now) {
            r.arrived_in_window += 1;
        }
        if schedule.measured(due) {
            let _ = r
                .hist
                .record(now.duration_since(start + due).as_micros() as u64);
        }
    }
    (stream, r)
}

async fn idle(
    url: String,
    connections: usize,
    source_offset: u8,
    hold: Duration,
    deflate: bool,
    warm: usize,
) {
    // 64 handshakes in flight: several times faster than one by one, and far
    // inside every listener's accept backlog.
    let url = &url;
    let message = chat_json(warm, 0);
    let message = &message;
    let sockets: Vec<Ws> = futures_util::stream::iter(0..connections)
        .map(|i| async move {
            let source = source_offset.wrapping_add((i % 254) as u8).max(1);
            let mut ws = open_deflate(url, source, &[], deflate).await;
            warm_up(&mut ws, message).await;
            ws
        })
        .buffer_unordered(64)
        .collect()
        .await;
    hold_open(sockets, hold).await;
}

/// `idle --http2`: the `connections` WebSockets as streams of HTTP/2
/// connections ([`open_http2`]); otherwise as [`idle`].
async fn idle_http2(
    url: String,
    connections: usize,
    per_connection: usize,
    source_offset: u8,
    hold: Duration,
    warm: usize,
) {
    let (_h2s, sockets) = open_http2(
        &url,
        connections,
        per_connection,
        source_offset,
        IDLE_WINDOWS,
    )
    .await;
    let message = &chat_json(warm, 0);
    let sockets: Vec<H2Ws> = futures_util::stream::iter(sockets)
        .map(|mut ws| async move {
            warm_up(&mut ws, message).await;
            ws
        })
        .buffer_unordered(64)
        .collect()
        .await;
    hold_open(sockets, hold).await;
}

/// `connections` WebSockets to the `ws://IP:PORT/path` in `url` as streams
/// of ceil(connections / `per_connection`) HTTP/2 connections, each from
/// the next source address after 127.0.0.`source_offset`, offering
/// `windows`; and the connections, which the caller keeps while it uses
/// the WebSockets.
async fn open_http2(
    url: &str,
    connections: usize,
    per_connection: usize,
    source_offset: u8,
    windows: Windows,
) -> (Vec<H2Connection>, Vec<H2Ws>) {
    let (addr, path) = split_url(url);
    let count = connections.div_ceil(per_connection.max(1));
    // Session i goes on connection i % count: none carries more than
    // ceil(connections / count) <= per_connection.
    let most = connections.div_ceil(count.max(1));
    let mut h2s = Vec::with_capacity(count);
    for j in 0..count {
        let source = source_offset.wrapping_add((j % 254) as u8).max(1);
        h2s.push(H2Connection::open(addr, source, most, windows).await);
    }
    let h2s_ref = &h2s;
    // 64 CONNECTs in flight, as `idle` has handshakes.
    let sockets = futures_util::stream::iter(0..connections)
        .map(|i| h2s_ref[i % count].websocket(path))
        .buffer_unordered(64)
        .collect()
        .await;
    (h2s, sockets)
}

/// Sends `message` (none if empty) on `ws` and waits for its echo: what
/// `idle --warm` does before a socket idles. Ignores pings and pongs;
/// panics on any other message or the socket's end.
async fn warm_up<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, message: &str) {
    if message.is_empty() {
        return;
    }
    ws.send(Message::text(message)).await.expect("send");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == message => break,
            Some(Ok(Message::Text(_) | Message::Binary(_))) => panic!("another echo"),
            Some(Ok(_)) => {}
            other => panic!("no echo: {other:?}"),
        }
    }
}

/// Prints `open N` and holds the sockets for `hold` (or until SIGINT),
/// unread: an idle client that reads nothing, so what the server sends
/// meanwhile (its pings) waits in the socket's (or the HTTP/2 stream's)
/// buffer. Then closes them.
async fn hold_open<S: AsyncRead + AsyncWrite + Unpin>(
    sockets: Vec<WebSocketStream<S>>,
    hold: Duration,
) {
    println!("open {}", sockets.len());
    tokio::select! {
        _ = tokio::time::sleep(hold) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
}

/// `idle --http2`'s: an idle session is sent next to nothing (a ping now
/// and then, unread), so small windows cost nothing and bound what the
/// client could be made to buffer: 64 KiB a stream, and 1 MiB a
/// connection of 100 streams, not the 64 MiB h2's per-stream default
/// would allow.
const IDLE_WINDOWS: Windows = Windows {
    stream: 64 * 1024,
    connection: 1 << 20,
};

/// `echo --http2`'s: one small message in flight per stream needs little,
/// but the client must never be what throttles the server's writes: 1 MiB
/// a stream, 16 MiB a connection.
const ECHO_WINDOWS: Windows = Windows {
    stream: 1 << 20,
    connection: 16 << 20,
};

/// A WebSocket on one stream of an HTTP/2 connection.
type H2Ws = WebSocketStream<Stream>;

/// One prior-knowledge HTTP/2 (h2c) connection to the server, on which
/// WebSockets open as extended CONNECT streams (RFC 8441); a task of its
/// own drives its frames (and answers the server's PINGs) until the
/// connection ends.
struct H2Connection(Connection);

impl H2Connection {
    /// Connects from 127.0.0.`source` to `addr` and returns once the
    /// server's SETTINGS have arrived, so that extended CONNECT and
    /// `streams` streams at once can be checked before any is opened: a
    /// stream over the server's limit would wait for one of the others to
    /// end, and idle ones never do. Offers `windows` as its receive windows.
    async fn open(addr: SocketAddr, source: u8, streams: usize, windows: Windows) -> H2Connection {
        let tcp = connect_from(addr, source).await;
        let (connection, driver) = Connection::handshake(tcp, format!("http://{addr}"), windows)
            .await
            .unwrap_or_else(|e| {
                panic!("HTTP/2 handshake with {addr} (does it serve HTTP/2?): {e}")
            });
        tokio::spawn(async move {
            // Its streams end with it: say why, for the run's log.
            if let Ok(Err(e)) = driver.await {
                eprintln!("loadgen: HTTP/2 connection to {addr} from 127.0.0.{source} failed: {e}");
            }
        });
        assert!(
            connection.allows_extended_connect(),
            "{addr} does not allow extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)"
        );
        let most = connection.max_streams();
        assert!(
            most >= streams,
            "{addr} allows {most} streams per HTTP/2 connection, {streams} asked (--streams-per-connection)"
        );
        H2Connection(connection)
    }

    /// Opens a WebSocket on `path`: an extended CONNECT (`:protocol
    /// websocket`), which the server must answer 200.
    async fn websocket(&self, path: &str) -> H2Ws {
        let origin = self.0.origin();
        let (head, io) = self
            .0
            .connect(path, &[])
            .await
            .unwrap_or_else(|e| panic!("CONNECT to {origin}{path}: {e}"));
        assert_eq!(
            head.status, 200,
            "CONNECT to {origin}{path} refused: {head:?}"
        );
        WebSocketStream::from_raw_socket(io, Role::Client, None).await
    }
}
