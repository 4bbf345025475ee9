//! Changing a running broker (the real binary): reloads by SIGHUP, by
//! `POST /admin/reload` and by `watch_config`; rejected reloads; mode
//! changes by reload and by `PUT`; targets replaced under traffic; routes
//! removed and targets drained, with `drain_timeout`.
//!
//! Traffic is sequence-numbered: every client keeps one message in flight
//! and expects its own echo back, in order, so a lost message shows as a
//! wait that runs out, a duplicated one as a number out of turn, and a
//! disconnect as an error or close on the socket.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{expect_close, header, http_get, raw_http, within, Client, Metrics};
use futures_util::{SinkExt, StreamExt};
use mux_peer::{Behavior, MuxPeer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The binary, started on a config file, with its JSON log kept.
struct Broker {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
    file: PathBuf,
    /// Every log line so far; the watch counts them.
    log: Arc<Mutex<Vec<serde_json::Value>>>,
    lines: watch::Receiver<usize>,
}

impl Broker {
    async fn start(yaml: &str) -> Broker {
        let file =
            std::env::temp_dir().join(format!("muxgate-reload-{}.yaml", uuid::Uuid::new_v4()));
        std::fs::write(&file, yaml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_muxgate"))
            .arg("--config")
            .arg(&file)
            .args(["--log-format", "json", "--log-level", "info"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn muxgate");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (count, lines) = watch::channel(0);
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
                let n = {
                    let mut log = kept.lock().unwrap();
                    log.push(v);
                    log.len()
                };
                count.send_replace(n);
            }
        });
        let mut broker = Broker {
            child,
            client: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            file,
            log,
            lines,
        };
        let listening = broker
            .log_line(
                "the listening log line",
                |v| v["message"] == "muxgate listening",
                0,
            )
            .await;
        broker.client = listening["client_addr"].as_str().unwrap().parse().unwrap();
        broker.admin = listening["admin_addr"].as_str().unwrap().parse().unwrap();
        broker
    }

    /// Log lines so far that `matches`.
    fn count(&self, matches: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|v| matches(v))
            .count()
    }

    /// Awaits the `(after + 1)`-th log line that `matches`.
    async fn log_line(
        &mut self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
        after: usize,
    ) -> serde_json::Value {
        let log = Arc::clone(&self.log);
        let found = || {
            log.lock()
                .unwrap()
                .iter()
                .filter(|v| matches(v))
                .nth(after)
                .cloned()
        };
        within(what, async {
            loop {
                if let Some(v) = found() {
                    return v;
                }
                self.lines.changed().await.expect("the broker is running");
            }
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.client, path)
    }

    fn write(&self, yaml: &str) {
        // Written whole and renamed in, as editors and ConfigMaps do.
        let next = self.file.with_extension("next");
        std::fs::write(&next, yaml).unwrap();
        std::fs::rename(&next, &self.file).unwrap();
    }

    async fn admin(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, _, text) = raw_http(
            self.admin,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                self.admin,
                body.len()
            ),
        )
        .await;
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, json)
    }

    async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        self.admin("POST", path, "").await
    }

    /// `POST /admin/reload` of `yaml`, expecting it applied.
    async fn reload(&self, yaml: &str) -> serde_json::Value {
        self.write(yaml);
        let (status, body) = self.post("/admin/reload").await;
        assert_eq!(status, 200, "reload applied: {body}");
        body
    }

    async fn metrics(&self) -> Metrics {
        let (status, _, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        Metrics::parse(&body)
    }

    /// `GET /admin/upstreams` until `settled` holds of it, for what the
    /// pool does a moment after the event a test awaits.
    async fn upstreams_when(
        &self,
        what: &str,
        settled: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        within(what, async {
            loop {
                let (_, u) = self.admin("GET", "/admin/upstreams", "").await;
                if settled(&u) {
                    return u;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    async fn generation(&self) -> String {
        let (_, headers, _) = http_get(self.admin, "/healthz").await;
        header(&headers, "x-muxgate-config-generation")
            .expect("generation header")
            .to_owned()
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Established TCP connections from this host to `port` on 127.0.0.1:
/// the sockets an upstream listening there holds, counted by the kernel.
fn sockets_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == remote && f[3] == "01"
        })
        .count()
}

/// Awaits `settled` over `/metrics`, for counts that settle a moment
/// after the event a test awaits.
async fn metrics_when(broker: &Broker, what: &str, settled: impl Fn(&Metrics) -> bool) -> Metrics {
    within(what, async {
        loop {
            let m = broker.metrics().await;
            if settled(&m) {
                return m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// `muxgate_config_reloads_total`: (applied, rejected).
async fn reloads(broker: &Broker) -> (f64, f64) {
    let m = broker.metrics().await;
    let count = |result| m.value("muxgate_config_reloads_total", &[("result", result)]);
    (count("applied"), count("rejected"))
}

/// Awaits `live` mux connections in the first upstream's pool.
async fn pool_live(broker: &Broker, live: u64) {
    broker
        .upstreams_when("the pool's connections", |u| u[0]["pool"]["live"] == live)
        .await;
}

async fn demo_upstream() -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
    (addr, stop)
}

async fn connect(url: &str) -> Client {
    within(
        "a WebSocket to the broker",
        tokio_tungstenite::connect_async(url),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    .0
}

/// One round trip of `text`: its echo must be the next message.
async fn round_trip(ws: &mut Client, text: String) -> Result<(), String> {
    ws.send(Message::text(text.clone()))
        .await
        .map_err(|e| format!("disconnected: send: {e}"))?;
    match tokio::time::timeout(common::TIMEOUT, ws.next()).await {
        Err(_) => Err(format!("lost: no echo of {text}")),
        Ok(Some(Ok(Message::Text(t)))) if *t == *text => Ok(()),
        Ok(Some(Ok(Message::Text(t)))) => Err(format!("duplicated or out of turn: {t} for {text}")),
        Ok(Some(Ok(Message::Close(f)))) => Err(format!("disconnected: closed with {f:?}")),
        Ok(other) => Err(format!("disconnected: {other:?}")),
    }
}

/// What a chattering client saw.
#[derive(Debug, Default)]
struct Tally {
    round_trips: u64,
    lost: u64,
    duplicated: u64,
    disconnected: u64,
}

impl Tally {
    /// No disconnect, no loss, no duplicate.
    fn assert_lossless(&self) {
        eprintln!("{self:?}");
        assert_eq!(
            (self.disconnected, self.lost, self.duplicated),
            (0, 0, 0),
            "{self:?}"
        );
    }
}

/// Sequence-numbered round trips on `ws` until `stop`, one every `pace`;
/// after each, reports (on `reached`) the first round trip begun after
/// each new `epoch`. Ends with a clean close.
async fn chatter(
    mut ws: Client,
    id: usize,
    pace: Duration,
    mut epoch: watch::Receiver<u64>,
    reached: mpsc::Sender<usize>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::default();
    let mut reported = 0;
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let began = *epoch.borrow_and_update();
        seq += 1;
        if let Err(e) = round_trip(&mut ws, format!("{id}:{seq}")).await {
            if e.starts_with("lost") {
                tally.lost += 1;
            } else if e.starts_with("duplicated") {
                tally.duplicated += 1;
            } else {
                tally.disconnected += 1;
            }
            eprintln!("client {id}: {e}");
            return tally;
        }
        tally.round_trips += 1;
        if began > reported {
            reported = began;
            let _ = reached.send(id).await;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pace) => {}
        }
    }
    let _ = ws.close(None).await;
    match tokio::time::timeout(common::TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {}
        other => {
            eprintln!("client {id}: no clean close: {other:?}");
            tally.disconnected += 1;
        }
    }
    tally
}

/// Clients chattering through the broker, and the means to await a round
/// trip of each begun after a given moment.
struct Traffic {
    epoch: watch::Sender<u64>,
    reached: mpsc::Receiver<usize>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Traffic {
    async fn start(urls: &[String], pace: Duration) -> Traffic {
        let (epoch, _) = watch::channel(0u64);
        let (report, reached) = mpsc::channel(urls.len().max(1));
        let stop = CancellationToken::new();
        let mut tasks = Vec::with_capacity(urls.len());
        for (id, url) in urls.iter().enumerate() {
            let ws = connect(url).await;
            tasks.push(tokio::spawn(chatter(
                ws,
                id,
                pace,
                epoch.subscribe(),
                report.clone(),
                stop.clone(),
            )));
        }
        Traffic {
            epoch,
            reached,
            stop,
            tasks,
        }
    }

    /// Awaits one round trip of every client begun after this call.
    async fn everyone_round_trips(&mut self, what: &str) {
        let next = *self.epoch.borrow() + 1;
        self.epoch.send_replace(next);
        let mut seen = vec![false; self.tasks.len()];
        let mut left = self.tasks.len();
        within(what, async {
            while left > 0 {
                let id = self.reached.recv().await.expect("clients report");
                if !std::mem::replace(&mut seen[id], true) {
                    left -= 1;
                }
            }
        })
        .await;
    }

    async fn finish(self) -> Tally {
        self.stop.cancel();
        let mut total = Tally::default();
        for t in self.tasks {
            let t = within("a client to finish", t).await.expect("client task");
            total.round_trips += t.round_trips;
            total.lost += t.lost;
            total.duplicated += t.duplicated;
            total.disconnected += t.disconnected;
        }
        total
    }
}

/// A config with `direct` (/ws/direct) and `mux` (/ws/mux) on `demo`, and
/// whatever `other` adds (more upstreams).
fn base_config(demo: SocketAddr, server: &str, other: &str) -> String {
    format!(
        "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
{server}
upstreams:
  - name: direct
    routes:
      - external_path: /ws/direct
        internal_path: /echo
    targets:
      - url: ws://{demo}
    websocket_config:
      enable_direct_communication: true
  - name: mux
    routes:
      - external_path: /ws/mux
        internal_path: /echo
    targets:
      - url: ws://{demo}
    websocket_config:
      enable_direct_communication: false
      pool_size: 2
{other}"
    )
}

/// The n-th version of an upstream `other` that every reload changes:
/// its route, targets, timers, mode and plugins in turn.
fn other_upstream(n: usize, demo: SocketAddr, spare: SocketAddr) -> String {
    let targets = if n % 3 == 0 {
        format!("      - url: ws://{demo}\n      - url: ws://{spare}\n        weight: 2\n")
    } else {
        format!("      - url: ws://{demo}\n")
    };
    let plugins = if n % 4 == 1 {
        "    plugins:\n      - name: message_size\n        stage: pre_request\n        settings:\n          max_bytes: 1000\n"
    } else {
        ""
    };
    format!(
        "  - name: other
    routes:
      - external_path: /ws/other-{n}
        internal_path: /echo
    targets:
{targets}{plugins}    websocket_config:
      enable_direct_communication: {direct}
      ping_period: {ping}s
",
        direct = n % 2 == 0,
        ping = 10 + n,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_keep_every_message_across_twenty_reloads_of_other_upstreams() {
    let (demo, _stop) = demo_upstream().await;
    let (spare, _stop_spare) = demo_upstream().await;
    let config = |n: usize| base_config(demo, "", &other_upstream(n, demo, spare));
    let mut broker = Broker::start(&config(0)).await;
    let mut urls: Vec<String> = (0..500).map(|_| broker.url("/ws/direct")).collect();
    urls.extend((0..500).map(|_| broker.url("/ws/mux")));
    let mut traffic = Traffic::start(&urls, Duration::from_millis(100)).await;
    traffic
        .everyone_round_trips("every client's first round trip")
        .await;
    let (_, before) = broker.admin("GET", "/admin/upstreams", "").await;
    let pool_of = |upstreams: &serde_json::Value| {
        upstreams
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "mux")
            .unwrap()["pool"]["connections"]
            .clone()
    };
    let sockets_before = sockets_to(demo.port());

    for n in 1..=20 {
        let generation = broker.generation().await;
        if n % 2 == 1 {
            // By SIGHUP: the reload's log line says it is done.
            let reloaded = broker.count(|v| v["message"] == "config reloaded");
            broker.write(&config(n));
            broker.signal("HUP");
            broker
                .log_line(
                    &format!("reload {n} by SIGHUP"),
                    |v| v["message"] == "config reloaded",
                    reloaded,
                )
                .await;
        } else {
            let body = broker.reload(&config(n)).await;
            let change = |name: &str| {
                body["changes"]["upstreams"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|u| u["name"] == name)
                    .unwrap()["change"]
                    .clone()
            };
            assert_eq!(change("direct"), "unchanged", "{body}");
            assert_eq!(change("mux"), "unchanged", "{body}");
            assert_eq!(change("other"), "changed", "{body}");
        }
        assert_ne!(broker.generation().await, generation, "reload {n} applied");
        // The new route is served, the old one is not.
        let mut fresh = connect(&broker.url(&format!("/ws/other-{n}"))).await;
        round_trip(&mut fresh, "hello".into()).await.unwrap();
        let (status, _, _) = raw_http(
            broker.client,
            &common::upgrade_request(broker.client, &format!("/ws/other-{}", n - 1), ""),
        )
        .await;
        assert_eq!(status, 404, "route of reload {} is gone", n - 1);
        let _ = fresh.close(None).await;
        traffic
            .everyone_round_trips(&format!("every client's round trip after reload {n}"))
            .await;
    }

    let (_, after) = broker.admin("GET", "/admin/upstreams", "").await;
    assert_eq!(
        pool_of(&before),
        pool_of(&after),
        "the same mux connections"
    );
    let tally = traffic.finish().await;
    tally.assert_lossless();
    assert!(tally.round_trips >= 21 * 1000, "{tally:?}");
    assert_eq!(reloads(&broker).await, (20.0, 0.0));
    // The 500 direct sessions and the pool held their sockets throughout
    // (other's own come and go).
    assert!(sockets_before >= 502, "{sockets_before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_one_of_two_mux_targets_under_traffic_moves_the_pool_without_loss() {
    let a = MuxPeer::start(Behavior::Echo).await;
    let b = MuxPeer::start(Behavior::Echo).await;
    let c = MuxPeer::start(Behavior::Echo).await;
    let config = |targets: [SocketAddr; 2]| {
        format!(
            "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
upstreams:
  - name: mux
    routes:
      - external_path: /ws/mux
        internal_path: /mux
    targets:
      - url: ws://{}
      - url: ws://{}
    websocket_config:
      enable_direct_communication: false
      pool_size: 2
",
            targets[0], targets[1]
        )
    };
    let broker = Broker::start(&config([a.addr, b.addr])).await;
    let on = |upstreams: &serde_json::Value| -> Vec<String> {
        let mut t: Vec<String> = upstreams[0]["pool"]["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["target"].as_str().unwrap().to_owned())
            .collect();
        t.sort();
        t
    };
    let target = |p: &MuxPeer| format!("ws://{}", p.addr);
    let mut first = vec![target(&a), target(&b)];
    first.sort();
    broker
        .upstreams_when("a connection on each target", |u| on(u) == first)
        .await;
    let urls: Vec<String> = (0..100).map(|_| broker.url("/ws/mux")).collect();
    let mut traffic = Traffic::start(&urls, Duration::from_millis(20)).await;
    traffic.everyone_round_trips("first round trips").await;

    let body = broker.reload(&config([a.addr, c.addr])).await;
    let change = &body["changes"]["upstreams"][0];
    assert_eq!(
        change["targets_removed"],
        serde_json::json!([target(&b)]),
        "{body}"
    );
    assert_eq!(
        change["targets_added"],
        serde_json::json!([target(&c)]),
        "{body}"
    );
    // The pool ends on the new targets, one move at a time.
    let mut moved = vec![target(&a), target(&c)];
    moved.sort();
    broker
        .upstreams_when("the pool on the new targets", |u| {
            on(u) == moved && b.open_connections() == 0
        })
        .await;
    traffic
        .everyone_round_trips("round trips after the move")
        .await;
    let tally = traffic.finish().await;
    tally.assert_lossless();
    assert!(c.open_connections() >= 1);
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_mux_connections_moved_total",
            &[
                ("upstream", "mux"),
                ("from", &target(&b)),
                ("to", &target(&c))
            ]
        ),
        1.0
    );
    assert_eq!(
        m.value("muxgate_sessions_draining", &[("upstream", "mux")]),
        0.0
    );
}

/// Reloads `yaml`, expecting a 400 whose first error is on the line
/// that holds `needle`; returns that error.
async fn rejected(broker: &Broker, yaml: &str, needle: &str) -> serde_json::Value {
    broker.write(yaml);
    let (status, body) = broker.post("/admin/reload").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["result"], "rejected");
    let line = yaml.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert_eq!(body["errors"][0]["line"], line, "{body}");
    body["errors"][0].clone()
}

#[tokio::test]
async fn a_rejected_reload_keeps_the_running_config_and_names_field_and_line() {
    let (demo, _stop) = demo_upstream().await;
    let good = base_config(demo, "", "");
    let broker = Broker::start(&good).await;
    let mut ws = connect(&broker.url("/ws/direct")).await;
    round_trip(&mut ws, "before".into()).await.unwrap();
    let generation = broker.generation().await;

    let unknown = good.replace(
        "      pool_size: 2\n",
        "      pool_size: 2\n      pool_sise: 3\n",
    );
    let error = rejected(&broker, &unknown, "pool_sise").await;
    assert!(
        error["path"]
            .as_str()
            .unwrap()
            .contains("upstreams[1].websocket_config"),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("pool_sise"),
        "{error}"
    );
    let bad_duration = good.replace(
        "      enable_direct_communication: true\n",
        "      enable_direct_communication: true\n      ping_period: 3 parsecs\n",
    );
    let error = rejected(&broker, &bad_duration, "parsecs").await;
    assert!(
        error["path"].as_str().unwrap().ends_with("ping_period"),
        "{error}"
    );

    // Nothing changed: the same generation, the old session and new ones work.
    assert_eq!(broker.generation().await, generation);
    round_trip(&mut ws, "after".into()).await.unwrap();
    let mut fresh = connect(&broker.url("/ws/mux")).await;
    round_trip(&mut fresh, "new".into()).await.unwrap();
    assert_eq!(reloads(&broker).await, (0.0, 2.0));
    assert!(
        broker.count(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("rejected"))
            && v["problem"]
                .as_str()
                .is_some_and(|p| p.contains("pool_sise")))
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_toggle_by_reload_or_put_moves_new_sessions_and_keeps_old_ones() {
    let (demo, _stop) = demo_upstream().await;
    let config = |direct: bool| {
        let in_mode = if direct {
            common::direct_config
        } else {
            common::mux_config
        };
        in_mode(&[demo], "pool_size: 2", "", "")
    };
    let broker = Broker::start(&config(true)).await;
    let active = |m: &Metrics, mode: &str| {
        m.value(
            "muxgate_sessions_active",
            &[("upstream", "echo"), ("mode", mode)],
        )
    };
    let mut first = connect(&broker.url("/ws/echo")).await;
    round_trip(&mut first, "direct".into()).await.unwrap();
    assert_eq!(sockets_to(demo.port()), 1, "one direct session");

    // By reload: new sessions multiplexed, the direct one keeps its socket.
    let body = broker.reload(&config(false)).await;
    pool_live(&broker, 2).await;
    assert_eq!(
        body["changes"]["upstreams"][0]["mode"],
        serde_json::json!(["direct", "multiplexed"]),
        "{body}"
    );
    let mut second = connect(&broker.url("/ws/echo")).await;
    round_trip(&mut second, "mux".into()).await.unwrap();
    round_trip(&mut first, "still direct".into()).await.unwrap();
    let m = broker.metrics().await;
    assert_eq!(
        (active(&m, "direct"), active(&m, "multiplexed")),
        (1.0, 1.0)
    );
    assert_eq!(
        sockets_to(demo.port()),
        1 + 2,
        "the direct session and the pool"
    );

    // By PUT: back to direct until the next reload.
    let (status, body) = broker
        .admin("PUT", "/admin/upstreams/echo/mode", "direct")
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, upstreams) = broker.admin("GET", "/admin/upstreams", "").await;
    assert_eq!(upstreams[0]["mode"], "direct");
    assert_eq!(upstreams[0]["mode_overridden"], true);
    let mut third = connect(&broker.url("/ws/echo")).await;
    round_trip(&mut third, "direct again".into()).await.unwrap();
    round_trip(&mut second, "still mux".into()).await.unwrap();
    assert_eq!(
        sockets_to(demo.port()),
        2 + 2,
        "two direct sessions and the old pool"
    );
    // The pool no longer used closes once its last session has ended.
    second.close(None).await.unwrap();
    let _ = within("the mux session's close", second.next()).await;
    within("the retired pool to close", async {
        while sockets_to(demo.port()) != 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (status, body) = broker
        .admin("PUT", "/admin/upstreams/nope/mode", "direct")
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = broker
        .admin("PUT", "/admin/upstreams/echo/mode", "sideways")
        .await;
    assert_eq!(status, 400);

    // A reload of the same file ends the override: multiplexed again.
    broker.reload(&config(false)).await;
    let (_, upstreams) = broker.admin("GET", "/admin/upstreams", "").await;
    assert_eq!(upstreams[0]["mode"], "multiplexed");
    assert_eq!(upstreams[0]["mode_overridden"], false);
    round_trip(&mut first, "first".into()).await.unwrap();
    round_trip(&mut third, "third".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_removed_route_or_a_drained_target_close_with_1001_after_drain_timeout() {
    let (demo, _stop) = demo_upstream().await;
    let (spare, _stop_spare) = demo_upstream().await;
    let config = |routes: &[&str]| {
        let routes: String = routes
            .iter()
            .map(|r| format!("      - external_path: {r}\n        internal_path: /echo\n"))
            .collect();
        format!(
            "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  drain_timeout: 4s
upstreams:
  - name: echo
    routes:
{routes}    targets:
      - url: ws://{demo}
      - url: ws://{spare}
    load_balancing: least_connections
    websocket_config:
      enable_direct_communication: true
"
        )
    };
    let mut broker = Broker::start(&config(&["/ws/a", "/ws/b"])).await;
    let mut on_a = connect(&broker.url("/ws/a")).await;
    let mut on_b = connect(&broker.url("/ws/b")).await;
    round_trip(&mut on_b, "b".into()).await.unwrap();

    let body = broker.reload(&config(&["/ws/a"])).await;
    assert_eq!(
        body["changes"]["upstreams"][0]["routes_removed"],
        serde_json::json!(["/ws/b"])
    );
    assert_eq!(
        body["changes"]["upstreams"][0]["sessions_draining"], 1,
        "{body}"
    );
    let (status, _, _) = raw_http(
        broker.client,
        &common::upgrade_request(broker.client, "/ws/b", ""),
    )
    .await;
    assert_eq!(status, 404, "a removed route is not served");
    // Draining, still working, until drain_timeout closes it with 1001.
    round_trip(&mut on_b, "still b".into()).await.unwrap();
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_sessions_draining", &[("upstream", "echo")]),
        1.0
    );
    let (code, reason) = expect_close(&mut on_b).await;
    assert_eq!((code, reason.as_str()), (1001, "route or target removed"));
    metrics_when(&broker, "the drained session's end", |m| {
        m.value("muxgate_sessions_draining", &[("upstream", "echo")]) == 0.0
    })
    .await;
    round_trip(&mut on_a, "a".into()).await.unwrap();

    // A target drained by hand: its sessions drain, new ones go elsewhere.
    let (_, upstreams) = broker.admin("GET", "/admin/upstreams", "").await;
    let busy = upstreams[0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["direct_sessions"] == 1)
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = broker
        .post(&format!("/admin/upstreams/echo/targets/{busy}/drain"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["direct_sessions"], 1);
    for _ in 0..3 {
        let mut fresh = connect(&broker.url("/ws/a")).await;
        round_trip(&mut fresh, "elsewhere".into()).await.unwrap();
        let _ = fresh.close(None).await;
    }
    let (_, upstreams) = broker.admin("GET", "/admin/upstreams", "").await;
    let drained = upstreams[0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["url"] == busy.as_str())
        .unwrap()
        .clone();
    assert_eq!(drained["drained"], true);
    assert_eq!(
        drained["direct_sessions"], 1,
        "only the session that was there"
    );
    let (code, _) = expect_close(&mut on_a).await;
    assert_eq!(code, 1001);
    let (status, _) = broker
        .post(&format!("/admin/upstreams/echo/targets/{busy}/undrain"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = broker
        .post("/admin/upstreams/echo/targets/ws://10.9.9.9:1/drain")
        .await;
    assert_eq!(status, 404);
    assert!(
        broker
            .count(|v| v["message"] == "drain_timeout ran out; closing drained sessions with 1001")
            >= 2
    );
    let _ = broker
        .log_line(
            "the reload's upstream line",
            |v| v["message"] == "upstream reloaded",
            0,
        )
        .await;
}

#[tokio::test]
async fn watch_config_reloads_when_the_file_is_replaced() {
    let (demo, _stop) = demo_upstream().await;
    let config =
        |route: &str| base_config(demo, "  watch_config: true", "").replace("/ws/direct", route);
    let mut broker = Broker::start(&config("/ws/one")).await;
    let generation = broker.generation().await;
    broker.write(&config("/ws/two"));
    broker
        .log_line(
            "a reload by watch_config",
            |v| v["message"] == "reloading config" && v["trigger"] == "watch_config",
            0,
        )
        .await;
    broker
        .log_line(
            "the reload applied",
            |v| v["message"] == "config reloaded",
            0,
        )
        .await;
    assert_ne!(broker.generation().await, generation);
    let mut ws = connect(&broker.url("/ws/two")).await;
    round_trip(&mut ws, "two".into()).await.unwrap();
    // A bad write is rejected once and leaves the config as it is.
    broker.write("upstreams: [");
    broker
        .log_line(
            "the rejected reload",
            |v| v["message"] == "config reload rejected; the running config stays",
            0,
        )
        .await;
    round_trip(&mut ws, "still two".into()).await.unwrap();
}
