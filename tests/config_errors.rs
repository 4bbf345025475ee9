//! The config contract: the shipped and fixture configs load, every invalid
//! fixture fails with exactly its `.expected` text (file, field path, line
//! and column), and `muxgate check` exits 64 on a bad file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

/// Relative to the package root, as the `.expected` files name them.
fn relative(path: &Path) -> PathBuf {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .to_path_buf()
}

/// The shipped upstreams.yaml and every valid fixture load.
#[test]
fn shipped_and_valid_configs_load() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstreams.yaml");
    let mut all = vec![shipped];
    all.extend(fixtures("valid"));
    for path in all {
        if let Err(e) = muxgate::config::load_file(&path) {
            panic!("{} should load:\n{e}", path.display());
        }
    }
}

/// Every invalid fixture fails with exactly the text of its `.expected` file.
#[test]
fn invalid_configs_fail_with_their_expected_errors() {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    for path in fixtures("invalid") {
        let expected = std::fs::read_to_string(path.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{}: missing .expected: {e}", path.display()));
        let err = match muxgate::config::load_file(&relative(&path)) {
            Ok(_) => panic!("{} should be rejected", path.display()),
            Err(e) => e,
        };
        assert_eq!(err.to_string(), expected.trim_end(), "{}", path.display());
        for field in err.field_errors() {
            assert!(
                field.location.is_some(),
                "{}: {field} has no line",
                path.display()
            );
        }
    }
}

/// Defaults match shared/config.md.
#[test]
fn defaults_follow_the_contract() {
    let c = muxgate::config::load_str(
        "defaults.yaml",
        "upstreams:\n  - name: e\n    routes: [{external_path: /a, internal_path: /b}]\n    targets: [{url: 'ws://h:1'}]\n    websocket_config: {enable_direct_communication: true}\n",
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.server.max_connections, 100_000);
    assert_eq!(c.server.max_connections_per_ip, 0);
    assert_eq!(c.server.shutdown_grace.as_secs(), 10);
    assert_eq!(c.server.header_read_timeout.as_secs(), 30);
    let u = &c.upstreams[0];
    assert_eq!(u.targets[0].weight, 1);
    let ws = &u.websocket_config;
    assert!(!ws.return_error_details);
    assert_eq!(ws.ping_period.as_secs(), 30);
    assert_eq!(ws.pong_wait.as_secs(), 45);
    assert_eq!(ws.handshake_timeout.as_secs(), 5);
    assert_eq!(ws.read_buffer_size.0, 4096);
    assert_eq!(ws.write_buffer_size.0, 4096);
    assert_eq!(ws.max_message_size.0, 1 << 20);
    assert_eq!(ws.pool_size, 4);
    assert_eq!(ws.client_queue, 256);
    assert_eq!(ws.resume_buffer, 64);
    assert_eq!(ws.resume_timeout.as_secs(), 5);
    let hc = &u.health_checks;
    assert!(hc.passive);
    assert_eq!(hc.threshold, 3);
    assert_eq!(hc.interval.as_secs(), 60);
}

/// `${NAME}` is expanded in string values only (not in comments).
#[test]
fn environment_variables_are_expanded_in_values() {
    std::env::set_var("MUXGATE_TEST_TARGET_HOST", "10.1.2.3");
    let c = muxgate::config::load_str(
        "env.yaml",
        "# a comment may mention ${MUXGATE_UNSET_IN_COMMENT}\nupstreams:\n  - name: e\n    routes: [{external_path: /a, internal_path: /b}]\n    targets: [{url: 'ws://${MUXGATE_TEST_TARGET_HOST}:1'}]\n    websocket_config: {enable_direct_communication: true}\n",
    )
    .unwrap();
    assert_eq!(&*c.upstreams[0].targets[0].url, "ws://10.1.2.3:1");
}

fn muxgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_muxgate"))
}

/// `muxgate check` exits 0 on a good file and 64 with the errors on a bad one;
/// starting the broker on a bad file exits 64 too.
#[test]
fn check_command_exit_codes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let good = muxgate()
        .args(["check", "--config"])
        .arg(root.join("upstreams.yaml"))
        .output()
        .unwrap();
    assert_eq!(good.status.code(), Some(0), "{good:?}");

    let bad_file = root.join("tests/fixtures/config/invalid/duplicate_path.yaml");
    let bad = muxgate()
        .args(["check", "--config"])
        .arg(&bad_file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert!(
        stderr.contains("upstreams[1].routes[1].external_path: duplicate external_path `/ws/echo`"),
        "{stderr}"
    );

    let run = muxgate().arg("--config").arg(&bad_file).output().unwrap();
    assert_eq!(run.status.code(), Some(64));

    let missing = muxgate()
        .args(["check", "--config", "/nonexistent/muxgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/muxgate.yaml: cannot read")
    );
}
