//! The monitoring that ships in `deploy/` fits the broker: every metric the
//! Grafana dashboard and the Prometheus alerts name is one a running broker
//! exports, and the laptop compose file mounts files that exist and scrapes
//! the port its broker config listens on.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::upstream::TestUpstream;
use common::*;
use mux_peer::{Behavior, MuxPeer, OutFrame, Payload, PeerEvent};
use tokio_tungstenite::tungstenite::Message;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The broker's metric names in a PromQL expression: every identifier that
/// starts with `muxgate_` (the registry's prefix of every metric).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("muxgate_")
            && (i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1].is_ascii_uppercase()));
        if starts {
            let end = (i..bytes.len())
                .find(|&j| !ident(bytes[j]))
                .unwrap_or(bytes.len());
            names.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every string under a key `key`, anywhere in `value`.
fn strings_under(value: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                strings_under(v, key, out);
            }
        }
        _ => {}
    }
}

/// Each PromQL expression the dashboard and the alerts hold, named by where
/// it is: panel targets (`expr`), template variable queries (`definition`),
/// and alert rules.
fn shipped_expressions() -> Vec<(String, String)> {
    let dashboard_path = deploy_dir().join("grafana/muxgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&dashboard_path)).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let mut panel_exprs = Vec::new();
    strings_under(&dashboard["panels"], "expr", &mut panel_exprs);
    assert!(panel_exprs.len() >= 15, "the dashboard has its panels");
    exprs.extend(
        panel_exprs
            .into_iter()
            .map(|e| ("dashboard".to_string(), e)),
    );
    let mut variables = Vec::new();
    strings_under(&dashboard["templating"], "definition", &mut variables);
    exprs.extend(
        variables
            .into_iter()
            .map(|e| ("dashboard variable".into(), e)),
    );

    let alerts = yaml(&deploy_dir().join("prometheus/alerts.yaml"));
    let mut alert_count = 0;
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule");
            let expr = rule["expr"].as_str().expect("an expr");
            for field in ["summary", "description", "runbook"] {
                assert!(
                    rule["annotations"][field].is_string(),
                    "{name} has the annotation {field}"
                );
            }
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            exprs.push((format!("alert {name}"), expr.to_string()));
            alert_count += 1;
        }
    }
    assert_eq!(alert_count, 6, "the six alerts");
    exprs
}

/// The series names of an exposition (`_bucket`, `_sum` and `_count` for a
/// histogram), each with its family (the histogram's name for those).
fn exported_series(text: &str) -> BTreeMap<String, String> {
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap().to_string();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| histograms.contains(f)))
                .unwrap_or(&name)
                .to_string();
            (name, family)
        })
        .collect()
}

/// An admin request, answered with its status and body.
async fn admin(running: &Running, method: &str, path: &str) -> (u16, String) {
    let addr = running.admin_addr;
    let (status, _, body) = raw_http(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
    )
    .await;
    (status, body)
}

/// A broker with a direct and a multiplexed upstream, driven through
/// sessions in both modes, messages both ways, a 404, a rejected reload, a
/// slow consumer, an upstream frame it drops and a drained target, exports
/// every metric the dashboard and the alerts name.
#[tokio::test]
async fn dashboard_and_alerts_name_only_metrics_the_broker_exports() {
    let exprs = shipped_expressions();
    for (place, expr) in &exprs {
        assert!(
            !metric_names(expr).is_empty(),
            "{place}: {expr:?} names no muxgate metric"
        );
    }

    let direct = TestUpstream::start().await;
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let config = format!(
        "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
upstreams:
  - name: echo
    routes:
      - external_path: /ws/echo
        internal_path: /echo
    targets:
      - url: ws://{direct}
    websocket_config:
      enable_direct_communication: true
  - name: chat
    routes:
      - external_path: /ws/chat
        internal_path: /chat
    targets:
      - url: ws://{mux}
    websocket_config:
      enable_direct_communication: false
      pool_size: 1
      client_queue: 4
",
        direct = direct.addr,
        mux = peer.addr,
    );
    let file = std::env::temp_dir().join(format!("muxgate-deploy-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&file, &config).unwrap();
    let broker = start_broker_from_file(&file).await;
    broker
        .metrics_when("a live mux connection", |m| {
            m.value(
                "muxgate_mux_connections",
                &[("upstream", "chat"), ("state", "live")],
            ) == 1.0
        })
        .await;

    // Sessions in both modes, text and binary both ways.
    let (mut on_direct, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut on_direct, Message::text("hello")).await;
    echo_roundtrip(
        &mut on_direct,
        Message::Binary(Bytes::from_static(b"\0\x01")),
    )
    .await;
    let (mut on_mux, _) = connect(&broker.url("/ws/chat"), &[]).await;
    let (conn, _, _) = peer.next_open().await;
    echo_roundtrip(&mut on_mux, Message::text("hello")).await;

    // A session that agreed permessage-deflate (the broker terminates it
    // in multiplexed mode): RFC 7692's compressed "Hello" comes back.
    let (mut compressed, head) = common::raw::RawPeer::client_with(
        broker.client_addr,
        "/ws/chat",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(
        head.to_ascii_lowercase().contains("permessage-deflate"),
        "{head}"
    );
    peer.next_open().await;
    compressed
        .write_frame(0xc1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00])
        .await;
    let echoed = within("the echo", compressed.read_frame())
        .await
        .expect("a frame");
    assert_eq!(echoed.payload, b"Hello");

    // A handshake for no route: 404.
    let a = broker.client_addr;
    let (status, _, _) = raw_http(a, &upgrade_request(a, "/ws/nowhere", "")).await;
    assert_eq!(status, 404);

    // A reload of a file with a problem is rejected, and changes nothing.
    std::fs::write(&file, "upstreams: [{name: broken}]\n").unwrap();
    let (status, body) = admin(&broker, "POST", "/admin/reload").await;
    assert_eq!(status, 400, "{body}");
    std::fs::write(&file, &config).unwrap();

    // An upstream frame the broker cannot decode is dropped.
    peer.send_raw(conn, Message::text("not json")).await;

    // A client that stops reading while its upstream floods it is closed
    // as a slow consumer, and what its queue held is dropped.
    let (slow, _) = connect(&broker.url("/ws/chat"), &[]).await;
    let (_, slow_id, _) = peer.next_open().await;
    let mut closed = None;
    for k in 0..4096 {
        let payload = Payload::Text(format!("{k:>60000}"));
        peer.send(
            conn,
            OutFrame::Message {
                session: slow_id,
                payload,
            },
        )
        .await;
        while let Some(event) = peer.try_next_event() {
            if let PeerEvent::Close { session, code, .. } = event {
                if session == slow_id {
                    closed = Some(code);
                }
            }
        }
        if closed.is_some() {
            break;
        }
    }
    assert_eq!(closed, Some(1008), "the slow consumer was closed");
    drop(slow);

    // A drained target's session drains; undrained, it goes on as before.
    let target = format!("ws://{}", direct.addr);
    let (status, body) = admin(
        &broker,
        "POST",
        &format!("/admin/upstreams/echo/targets/{target}/drain"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    broker
        .metrics_when("the drained session", |m| {
            m.value("muxgate_sessions_draining", &[("upstream", "echo")]) == 1.0
        })
        .await;
    let (status, body) = admin(
        &broker,
        "POST",
        &format!("/admin/upstreams/echo/targets/{target}/undrain"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    echo_roundtrip(&mut on_direct, Message::text("still here")).await;
    on_direct.close(None).await.unwrap();
    expect_end(&mut on_direct).await;

    let m = broker
        .metrics_when("the slow consumer's close counted", |m| {
            m.value("muxgate_slow_consumer_closes_total", &[]) == 1.0
                && m.value(
                    "muxgate_messages_dropped_total",
                    &[("upstream", "chat"), ("reason", "session_closed")],
                ) > 0.0
                && m.value(
                    "muxgate_mux_frames_dropped_total",
                    &[("reason", "invalid_json")],
                ) == 1.0
                && m.value("muxgate_sessions_active", &[("mode", "direct")]) == 0.0
        })
        .await;
    assert_eq!(
        m.value("muxgate_config_reloads_total", &[("result", "rejected")]),
        1.0
    );
    let (_, _, text) = http_get(broker.admin_addr, "/metrics").await;
    let series = exported_series(&text);
    let families: BTreeSet<&str> = series.values().map(String::as_str).collect();
    println!(
        "the broker exported {} families: {families:?}",
        families.len()
    );

    let mut referenced = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, expr) in &exprs {
        for name in metric_names(expr) {
            if !series.contains_key(&name) {
                missing.push(format!("{place}: {name}"));
            }
            referenced.insert(name);
        }
    }
    println!(
        "{} expressions name {} series: {referenced:?}",
        exprs.len(),
        referenced.len()
    );
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported by the broker:\n  {}",
        missing.join("\n  ")
    );
    let unused: Vec<&&str> = families
        .iter()
        .filter(|f| {
            !referenced
                .iter()
                .any(|r| series.get(r).map(String::as_str) == Some(**f))
        })
        .collect();
    println!("exported families neither the dashboard nor the alerts show: {unused:?}");
    drop(on_mux);
    let _ = std::fs::remove_file(&file);
}

/// The tokenizer takes whole metric names, and only the broker's.
#[test]
fn metric_names_are_the_muxgate_identifiers_of_an_expression() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(muxgate_handshake_duration_seconds_bucket{job="muxgate_x"}[5m]))) / up + my_muxgate_thing"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    // The label value is a string the tokenizer cannot tell from a name;
    // it is counted, which can only make the check stricter.
    assert_eq!(
        names,
        ["muxgate_handshake_duration_seconds_bucket", "muxgate_x"]
    );
}

fn service<'a>(compose: &'a serde_yaml::Value, name: &str) -> &'a serde_yaml::Value {
    let s = &compose["services"][name];
    assert!(s.is_mapping(), "compose.yaml has the service {name}");
    s
}

/// A service's bind mounts: host path (resolved from deploy/) to container path.
fn mounts(service: &serde_yaml::Value) -> Vec<(PathBuf, String)> {
    service["volumes"]
        .as_sequence()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|v| {
            let v = v.as_str().expect("short volume syntax");
            let mut parts = v.split(':');
            let host = parts.next().unwrap();
            let container = parts.next().expect("host:container").to_string();
            assert!(host.starts_with("./"), "{v}: a file of the repository");
            (deploy_dir().join(host), container)
        })
        .collect()
}

/// The host file `service` mounts at `container`.
fn mounted_at(service: &serde_yaml::Value, container: &str) -> PathBuf {
    mounts(service)
        .into_iter()
        .find(|(_, c)| c == container)
        .unwrap_or_else(|| panic!("nothing is mounted at {container}"))
        .0
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The compose file has its four services; the files they mount exist;
/// Prometheus scrapes the admin port the mounted broker config listens on
/// and loads the alerts; Grafana provisions the dashboard file.
#[test]
fn compose_file_mounts_what_exists_and_scrapes_the_admin_port() {
    let compose = yaml(&deploy_dir().join("compose.yaml"));
    let names: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["muxgate", "demo-upstream", "prometheus", "grafana"])
    );
    for name in &names {
        for (host, container) in mounts(service(&compose, name)) {
            assert!(
                host.is_file(),
                "{name} mounts {} at {container}: no such file",
                host.display()
            );
        }
    }
    for name in ["muxgate", "demo-upstream"] {
        let build = &service(&compose, name)["build"];
        assert_eq!(build["context"].as_str(), Some(".."), "{name}");
        assert_eq!(
            build["dockerfile"].as_str(),
            Some("deploy/Dockerfile"),
            "{name}"
        );
    }

    // The broker's config, as the command names it.
    let muxgate = service(&compose, "muxgate");
    let args = strings(&muxgate["command"]);
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let config_file = mounted_at(muxgate, &args[at + 1]);
    let config = muxgate::config::load_file(&config_file)
        .unwrap_or_else(|e| panic!("the compose broker config is invalid:\n{e}"));
    let admin_port = config.server.admin_listen.port();
    assert!(
        config.server.admin_listen.ip().is_unspecified(),
        "Prometheus reaches the admin listener from another container"
    );
    let demo = strings(&service(&compose, "demo-upstream")["command"]);
    let at = demo
        .iter()
        .position(|a| a == "--demo")
        .expect("the demo service runs `muxgate --demo ADDR`");
    let demo_port = demo[at + 1].rsplit(':').next().unwrap();
    for upstream in &config.upstreams {
        for target in &upstream.targets {
            assert_eq!(
                &*target.url,
                format!("ws://demo-upstream:{demo_port}"),
                "upstream {}",
                &*upstream.name
            );
        }
    }

    // Prometheus: the scrape target and the rules.
    let prometheus = service(&compose, "prometheus");
    let flag = strings(&prometheus["command"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .expect("--config.file");
    let scrape = yaml(&mounted_at(prometheus, &flag));
    let targets: Vec<String> = scrape["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| strings(&sc["targets"]))
        .collect();
    assert!(
        targets.contains(&format!("muxgate:{admin_port}")),
        "prometheus.yml scrapes muxgate:{admin_port} (server.admin_listen), not only {targets:?}"
    );
    let rules = strings(&scrape["rule_files"]);
    assert!(!rules.is_empty(), "prometheus.yml loads rules");
    for rule_file in rules {
        let host = mounted_at(prometheus, &rule_file);
        assert_eq!(host, deploy_dir().join("./prometheus/alerts.yaml"));
    }

    // Grafana: the data source is the prometheus service, the dashboard
    // provider's folder holds the dashboard file.
    let grafana = service(&compose, "grafana");
    let provisioned: Vec<(PathBuf, String)> = mounts(grafana)
        .into_iter()
        .filter(|(_, c)| c.starts_with("/etc/grafana/provisioning/"))
        .collect();
    let of_kind = |kind: &str| {
        provisioned
            .iter()
            .find(|(_, c)| c.starts_with(&format!("/etc/grafana/provisioning/{kind}/")))
            .map(|(h, _)| yaml(h))
            .unwrap_or_else(|| panic!("grafana provisions {kind}"))
    };
    let datasources = of_kind("datasources");
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"].as_str(), Some("prometheus"));
    assert_eq!(source["url"].as_str(), Some("http://prometheus:9090"));
    let dashboards = of_kind("dashboards");
    let folder = dashboards["providers"][0]["options"]["path"]
        .as_str()
        .expect("the provider's path");
    let dashboard = mounts(grafana)
        .into_iter()
        .find(|(_, c)| Path::new(c).parent() == Some(Path::new(folder)))
        .unwrap_or_else(|| panic!("nothing mounted in the provider's folder {folder}"));
    assert_eq!(dashboard.0, deploy_dir().join("./grafana/muxgate.json"));
}
