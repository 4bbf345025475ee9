//! A restart without downtime, with the real binary: a second process
//! with `server.reuse_port` binds the ports of a first, and once its
//! `/readyz` says 200 the first gets SIGTERM. Clients that open, use and
//! close sessions all the while are never refused, no handshake fails,
//! and the first process's sessions end with 1001, after the second was
//! ready.
//!
//! Without `net.ipv4.tcp_migrate_req = 1` the kernel resets the
//! connections still in a listener's queue when it closes; the old
//! process takes that queue before closing, which leaves a window of
//! microseconds (see `transport::accept`), in which a connection is still
//! reset. These tests set the sysctl where they may (the README asks
//! operators to) and put it back after, so that what they measure is the
//! broker's part of the handover.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Clients opening sessions one after another, each on its own.
const CLIENTS: usize = 8;
/// Sessions held on the old process through the handover.
const HELD: usize = 16;
/// Sessions the clients complete in each phase before the next step.
const PER_PHASE: u64 = 300;

/// The old process's log lines of the handover.
const HANDING_OVER: &str =
    "handing over: closing the client listener, finishing the handshakes it took";
const HANDED_OVER: &str = "client listener closed, its handshakes done";

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Sessions opened, echoed and closed by the client.
    completed: AtomicU64,
    /// TCP connects refused (or failed otherwise).
    refused: AtomicU64,
    /// Connected, but no 101: reset, closed, or another status.
    handshake_failures: AtomicU64,
    /// Upgraded, then closed by the broker before the echo came back:
    /// when, and with what code (`None`: no close frame).
    cut: Mutex<Vec<(Instant, Option<u16>)>>,
    /// What each failure was, for the assertion's message.
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.failures.lock().unwrap().push(what);
    }
}

/// One session: connect, upgrade, one echo, close.
async fn one_session(addr: SocketAddr, n: u64, tally: &Tally) {
    let tcp = match TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(e) => return tally.failed(&tally.refused, format!("connect: {e}")),
    };
    let url = format!("ws://{addr}/ws/echo");
    let mut ws = match tokio_tungstenite::client_async(url.as_str(), tcp).await {
        Ok((ws, _)) => ws,
        Err(e) => return tally.failed(&tally.handshake_failures, format!("handshake: {e}")),
    };
    let text = format!("message {n}");
    if ws.send(Message::text(text.clone())).await.is_err() {
        tally.cut.lock().unwrap().push((Instant::now(), None));
        return;
    }
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), text, "echo differs");
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|CloseFrame { code, .. }| u16::from(code));
                tally.cut.lock().unwrap().push((Instant::now(), code));
                // Answer the close and read to the end.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            other => {
                tally.cut.lock().unwrap().push((Instant::now(), None));
                eprintln!("session {n} ended without a close: {other:?}");
                return;
            }
        }
    }
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    tally.completed.fetch_add(1, Ordering::Relaxed);
}

/// Runs [`CLIENTS`] clients until `stop`; `done` follows the completed
/// sessions.
fn clients(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: CancellationToken,
    done: watch::Sender<u64>,
) -> tokio::task::JoinSet<()> {
    let done = Arc::new(done);
    let mut set = tokio::task::JoinSet::new();
    for client in 0..CLIENTS as u64 {
        let (tally, stop, done) = (Arc::clone(&tally), stop.clone(), Arc::clone(&done));
        set.spawn(async move {
            let mut n = client << 32;
            while !stop.is_cancelled() {
                one_session(addr, n, &tally).await;
                n += 1;
                done.send_replace(tally.completed.load(Ordering::Relaxed));
            }
        });
    }
    set
}

/// Waits until the clients have completed `more` sessions from now.
async fn sessions_completed(done: &mut watch::Receiver<u64>, more: u64) {
    let target = *done.borrow_and_update() + more;
    within("the clients' sessions", done.wait_for(|n| *n >= target))
        .await
        .expect("clients running");
}

/// Asks the shared admin port for `/readyz` until process `pid` answers
/// it 200 (the kernel gives each connection to one of the processes).
async fn ready(admin: SocketAddr, pid: u32) {
    let pid = pid.to_string();
    within("the new process's /readyz 200", async {
        loop {
            let (status, headers, _) = http_get(admin, "/readyz").await;
            if header(&headers, "x-muxgate-pid") == Some(pid.as_str()) && status == 200 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// `net.ipv4.tcp_migrate_req` set to 1 where the tests may, while one
/// of them holds it; put back as it was when the last one is done.
struct MigrateRequests {
    /// What it is, for the test's report.
    state: String,
}

/// How many tests hold [`MigrateRequests`], and what the sysctl was
/// before the first, if it changed it.
static HOLDERS: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

impl MigrateRequests {
    fn set() -> MigrateRequests {
        let mut holders = HOLDERS.lock().unwrap();
        holders.0 += 1;
        let state = match std::fs::read_to_string(MIGRATE_REQ) {
            Ok(v) if v.trim() == "1" => "1".to_string(),
            Ok(v) => match std::fs::write(MIGRATE_REQ, "1") {
                Ok(()) => {
                    holders.1 = Some(v);
                    "1 (set by the test)".to_string()
                }
                Err(e) => format!("{} (not writable: {e})", v.trim()),
            },
            Err(e) => format!("unavailable ({e})"),
        };
        MigrateRequests { state }
    }
}

impl Drop for MigrateRequests {
    fn drop(&mut self) {
        let mut holders = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        holders.0 -= 1;
        if holders.0 == 0 {
            if let Some(was) = holders.1.take() {
                let _ = std::fs::write(MIGRATE_REQ, was);
            }
        }
    }
}

/// `/metrics` of process `pid`, asked on the shared admin port until that
/// process answers.
async fn metrics_of(admin: SocketAddr, pid: u32) -> Metrics {
    let pid = pid.to_string();
    within("the process's /metrics", async {
        loop {
            let (status, headers, body) = http_get(admin, "/metrics").await;
            if header(&headers, "x-muxgate-pid") == Some(pid.as_str()) {
                assert_eq!(status, 200);
                return Metrics::parse(&body);
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Connections the process's event loops have taken.
fn accepted(m: &Metrics) -> f64 {
    m.value("muxgate_connections_accepted_total", &[])
}

fn config_file(yaml: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("muxgate-restart-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A config of one upstream `echo` on `demo`, in either mode.
type ConfigIn = fn(&[SocketAddr], &str, &str, &str) -> String;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_multiplexed_mode_refuses_no_client() {
    restart_without_downtime(mux_config, "pool_size: 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_direct_mode_refuses_no_client() {
    restart_without_downtime(direct_config, "").await;
}

/// The restart of the module docs, clients running all along, with `ws`
/// in the upstream's `websocket_config`.
async fn restart_without_downtime(config: ConfigIn, ws: &str) {
    let migrate = MigrateRequests::set();
    let stop_upstream = CancellationToken::new();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = upstream.local_addr().unwrap();
    tokio::spawn(muxgate_backend::demo::serve(
        upstream,
        stop_upstream.clone(),
    ));

    // The old process, on ports of its choosing.
    let server = "reuse_port: true\nshutdown_grace: 5s";
    let yaml = config(&[up], ws, "", server);
    let old_config = config_file(&yaml);
    let mut old = spawn_binary_logged(&old_config, &[], &[HANDING_OVER, HANDED_OVER]).await;
    let (client, admin) = (old.client_addr, old.admin_addr);

    // Sessions held on it (the only process yet) through the handover.
    let url = format!("ws://{client}/ws/echo");
    let mut held = Vec::new();
    for i in 0..HELD {
        let (mut ws, _) = connect(&url, &[]).await;
        echo_roundtrip(&mut ws, Message::text(format!("held {i}"))).await;
        held.push(ws);
    }

    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();
    let (done, mut completed) = watch::channel(0);
    let mut running = clients(client, Arc::clone(&tally), stop.clone(), done);
    sessions_completed(&mut completed, PER_PHASE).await;
    let alone = accepted(&metrics_of(admin, old.pid()).await);

    // The new process, on the same ports.
    let new_yaml = yaml
        .replace(
            "admin_listen: 127.0.0.1:0",
            &format!("admin_listen: {admin}"),
        )
        .replace("  listen: 127.0.0.1:0", &format!("  listen: {client}"));
    let new_config = config_file(&new_yaml);
    let mut new = spawn_binary_logged(&new_config, &[], &[]).await;
    assert_eq!((new.client_addr, new.admin_addr), (client, admin));
    ready(admin, new.pid()).await;
    let new_ready = Instant::now();
    // Both serve the port now (the kernel spreads the connections), and
    // the held sessions are untouched.
    sessions_completed(&mut completed, PER_PHASE).await;
    assert!(
        accepted(&metrics_of(admin, old.pid()).await) > alone,
        "the old process took no connection once the new one was up"
    );
    assert!(accepted(&metrics_of(admin, new.pid()).await) > 0.0);
    for (i, ws) in held.iter_mut().enumerate() {
        echo_roundtrip(ws, Message::text(format!("still {i}"))).await;
    }

    sigterm(&old.child);
    old.log_line(HANDING_OVER).await;
    for ws in &mut held {
        let (code, _) = expect_close(ws).await;
        assert_eq!(code, 1001, "a held session's close");
        assert!(Instant::now() > new_ready);
        expect_end(ws).await;
    }
    // Its handshakes were all done within the handover's limit.
    old.log_line(HANDED_OVER).await;
    let status = within("the old process to exit", old.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // Only the new process serves the port now.
    sessions_completed(&mut completed, PER_PHASE).await;
    stop.cancel();
    within("the clients to stop", async {
        while running.join_next().await.is_some() {}
    })
    .await;

    let cut = tally.cut.lock().unwrap().clone();
    let failures = tally.failures.lock().unwrap().clone();
    let (refused, failed) = (
        tally.refused.load(Ordering::Relaxed),
        tally.handshake_failures.load(Ordering::Relaxed),
    );
    eprintln!(
        "tcp_migrate_req {}: {} sessions completed, {refused} connects refused, \
         {failed} handshakes failed, {} sessions cut by the old process ({:?})",
        migrate.state,
        tally.completed.load(Ordering::Relaxed),
        cut.len(),
        cut.iter().map(|(_, code)| *code).collect::<Vec<_>>(),
    );
    assert_eq!(
        (refused, failed),
        (0, 0),
        "tcp_migrate_req {}: {failures:#?}",
        migrate.state
    );
    // A session the old process took while handing over may get its
    // 1001 before its echo: its client reconnects, as to any restart.
    for (when, code) in &cut {
        assert_eq!(*code, Some(1001), "a session cut by the restart");
        assert!(*when > new_ready);
    }

    sigterm(&new.child);
    let status = within("the new process to exit", new.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    stop_upstream.cancel();
    let _ = std::fs::remove_file(&old_config);
    let _ = std::fs::remove_file(&new_config);
}
