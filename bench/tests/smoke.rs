//! Smoke run of `bench/run.sh`: every path and every measure in a tiny
//! configuration (sub-second runs, 200 idle sessions), written to a scratch
//! directory instead of the committed BENCHMARKS.md and charts.
//!
//! It uses the debug binaries `cargo test` builds, never the release ones
//! run.sh would build: a nested release build takes minutes on a fresh
//! clone, while the debug build of the broker and the demo upstream is
//! already there (their own integration tests need it) or is a link away.
//! Debug numbers mean nothing; the test only checks that the harness
//! produces a number everywhere and valid charts.
//!
//! It needs NGINX, HAProxy and a DejaVu font: run.sh installs them from apt
//! when missing (`.ci/run` does so up front), and the test fails, never
//! skips, when they cannot be had.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PATHS: [&str; 5] = ["none", "nginx", "haproxy", "muxgate-direct", "muxgate-mux"];
const PROXIES: [&str; 4] = ["nginx", "haproxy", "muxgate-direct", "muxgate-mux"];

/// bench/run.sh runs end to end and leaves a number in every cell of the
/// results file and of BENCHMARKS.md, and three valid PNG charts.
#[test]
fn run_sh_writes_every_number_and_chart() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    build_broker_binaries(root, bin);
    let out = scratch_dir("run");
    let started = Instant::now();

    let run = Command::new("timeout")
        .args(["300", "bash"])
        .arg(root.join("bench/run.sh"))
        .env("BENCH_BIN", bin)
        .env("BENCH_OUT", &out)
        .env("BENCH_DURATION", "300ms")
        .env("BENCH_WARMUP", "100ms")
        // Two rounds, so the medians are of more than one number.
        .env("BENCH_ROUNDS", "2")
        .env("BENCH_ECHO_ROUNDS", "2")
        .env("BENCH_RATE", "1000")
        .env("BENCH_IDLE_DIRECT", "200")
        .env("BENCH_IDLE_MUX", "200")
        .env("BENCH_PORT_BASE", free_port_base(0).to_string())
        .output()
        .expect("run bench/run.sh");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "bench/run.sh failed:\n{log}");
    eprintln!("bench/run.sh took {:?}", started.elapsed());

    let results = read_results(&out.join("bench/results.tsv"));
    let mut expected: Vec<(&str, &str)> = Vec::new();
    for path in PATHS {
        for measure in [
            "echo_64_per_sec",
            "echo_4k_per_sec",
            "latency_achieved_per_sec",
            "latency_p50_us",
            "latency_p99_us",
            "latency_p999_us",
        ] {
            expected.push((measure, path));
        }
    }
    for path in PROXIES {
        for measure in [
            "idle_sessions",
            "idle_bytes_per_session",
            "upstream_sockets",
            "open_files",
            "cpu_us_per_message",
        ] {
            expected.push((measure, path));
        }
    }
    for (measure, path) in expected {
        let value = results
            .get(&(measure.to_string(), path.to_string()))
            .unwrap_or_else(|| panic!("results.tsv has no {measure} for {path}\n{log}"));
        assert!(*value > 0.0, "{measure} for {path} is {value}\n{log}");
    }

    let report = std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    let rows = table_rows(&report);
    // Throughput and latency: one row per path; CPU and memory: one per proxy.
    assert_eq!(rows.len(), 2 * PATHS.len() + 2 * PROXIES.len(), "{report}");
    for row in rows {
        for cell in &row[1..] {
            assert!(
                is_number_cell(cell),
                "not a number: {cell:?} in the row {row:?}\n{report}"
            );
        }
    }
    let verdicts = report
        .lines()
        .filter(|l| l.contains(": met (") || l.contains(": **not met** ("))
        .count();
    assert_eq!(verdicts, 8, "a verdict for every target:\n{report}");
    // Throughput at both sizes and p99 say how many of the 2 rounds direct
    // mode was as good as the better proxy in.
    let paired = report
        .lines()
        .filter(|l| {
            l.split_once("as good or better in ")
                .and_then(|(_, rest)| rest.split_once(" of 2 rounds)"))
                .is_some_and(|(won, _)| matches!(won, "0" | "1" | "2"))
        })
        .count();
    assert_eq!(paired, 3, "rounds won on throughput and p99:\n{report}");

    for chart in ["throughput", "latency", "cpu", "memory"] {
        let file = out.join(format!("bench/charts/{chart}.png"));
        assert!(report.contains(&format!("(bench/charts/{chart}.png)")));
        check_png(&file);
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// bench/compression-cpu.sh runs end to end in a tiny configuration and
/// leaves a number in every cell of its section: the five variants' CPU
/// and latency, the bytes of each hop that compresses, the codec alone.
#[test]
fn compression_cpu_sh_writes_every_number() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    build_broker_binaries(root, bin);
    let out = scratch_dir("compression-cpu");
    std::fs::create_dir_all(out.join("bench")).unwrap();
    std::fs::write(out.join("BENCHMARKS.md"), "# Benchmarks\n").unwrap();
    let run = Command::new("timeout")
        .args(["120", "bash"])
        .arg(root.join("bench/compression-cpu.sh"))
        .env("BENCH_BIN", bin)
        .env("BENCH_OUT", &out)
        .env("BENCH_CPU_CONNECTIONS", "4")
        .env("BENCH_CPU_RATE", "200")
        .env("BENCH_CPU_DURATION", "300ms")
        .env("BENCH_CODEC_MESSAGES", "200")
        .env("BENCH_CODEC_STATES", "20")
        .env("BENCH_PORT_BASE", free_port_base(1).to_string())
        .output()
        .expect("run bench/compression-cpu.sh");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        run.status.success(),
        "bench/compression-cpu.sh failed:\n{log}"
    );
    let report = std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    assert!(report.contains("## Compression's CPU"), "{report}");
    let rows: Vec<Vec<String>> = table_rows(&report)
        .into_iter()
        .filter(|row| !row[0].starts_with("variant") && !row[0].starts_with("sessions'"))
        .collect();
    assert_eq!(
        rows.len(),
        5 + 3,
        "five variants, three codec runs:\n{report}"
    );
    let hops = |cell: &str| {
        cell == "uncompressed"
            || cell == "(direct)"
            || (cell.contains(" MiB as ") && cell.contains('%'))
    };
    for row in &rows[..5] {
        // round trips, CPU per round trip, latency p50 / p99, client hop, mux hop.
        assert!(
            is_number_cell(&row[1]) && is_number_cell(&row[2]),
            "{row:?}\n{report}"
        );
        let (p50, p99) = row[3].split_once(" / ").expect("p50 / p99");
        assert!(is_number_cell(p50) && is_number_cell(p99), "{row:?}");
        assert!(hops(&row[4]) && hops(&row[5]), "{row:?}\n{report}");
    }
    // Where the broker compresses, it counted the bytes.
    assert!(rows[1][4].contains(" MiB as "), "mux-client: {:?}", rows[1]);
    assert!(
        rows[2][5].contains(" MiB as "),
        "mux-both's mux hop: {:?}",
        rows[2]
    );
    for row in &rows[5..] {
        let share = row[3].trim_end_matches('%');
        assert!(
            row[..3].iter().all(|c| is_number_cell(c)) && is_number_cell(share),
            "{row:?}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// bench/http2.sh runs end to end with a few sessions and short echo runs
/// and leaves a number in every cell of its section: the four variants'
/// RSS, client connections and open files, the HTTP/2 ones' sessions
/// sharing a few connections; and their round trips per second and CPU
/// per round trip, with the ratios to HTTP/1.1.
#[test]
fn http2_sh_writes_every_number() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_loadgen")).parent().unwrap();
    build_broker_binaries(root, bin);
    let out = scratch_dir("http2");
    std::fs::create_dir_all(out.join("bench")).unwrap();
    std::fs::write(out.join("BENCHMARKS.md"), "# Benchmarks\n").unwrap();
    let run = Command::new("timeout")
        .args(["120", "bash"])
        .arg(root.join("bench/http2.sh"))
        .env("BENCH_BIN", bin)
        .env("BENCH_OUT", &out)
        .env("BENCH_HTTP2_SESSIONS", "200")
        // Several streams on each of several connections per loadgen.
        .env("BENCH_HTTP2_STREAMS", "30")
        .env("BENCH_HTTP2_DURATION", "1s")
        .env("BENCH_HTTP2_ROUNDS", "1")
        .env("BENCH_PORT_BASE", free_port_base(2).to_string())
        .output()
        .expect("run bench/http2.sh");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "bench/http2.sh failed:\n{log}");
    let report = std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    assert!(
        report.contains("## Memory per idle session over HTTP/2"),
        "{report}"
    );
    let (memory, relaying) = report
        .split_once("### Relaying over HTTP/2")
        .unwrap_or_else(|| panic!("no relaying table:\n{report}"));
    let rows = |table: &str| -> Vec<Vec<String>> {
        let rows: Vec<Vec<String>> = table_rows(table)
            .into_iter()
            .filter(|row| !row[0].starts_with("variant"))
            .collect();
        let variants: Vec<&str> = rows.iter().map(|row| row[0].as_str()).collect();
        assert_eq!(
            variants,
            [
                "direct, HTTP/1.1",
                "direct, HTTP/2",
                "multiplexed, HTTP/1.1",
                "multiplexed, HTTP/2"
            ],
            "{report}"
        );
        rows
    };
    for row in &rows(relaying) {
        // Round trips/s and CPU per round trip (each "median (range)"),
        // their ratios to HTTP/1.1: 1 for HTTP/1.1 itself.
        assert_eq!(row.len(), 5, "{row:?}\n{report}");
        assert!(
            row[1..].iter().all(|c| is_number_cell(c)),
            "not a number in {row:?}\n{report}"
        );
        if row[0].ends_with("HTTP/1.1") {
            assert_eq!(row[3..], ["1.00", "1.00"], "{row:?}\n{report}");
        }
    }
    for row in &rows(memory) {
        // sessions, client connections, RSS before / after, per session, open files.
        assert_eq!(row.len(), 7, "{row:?}\n{report}");
        assert!(
            row[1..].iter().all(|c| is_number_cell(c)),
            "not a number in {row:?}\n{report}"
        );
        assert_eq!(row[1], "200", "{row:?}");
        // hold_idle's two loadgens hold 100 sessions each: one connection
        // apiece over HTTP/1.1, ceil(100 / 30) = 4 apiece over HTTP/2.
        let connections = if row[0].ends_with("HTTP/2") {
            "8"
        } else {
            "200"
        };
        assert_eq!(row[2], connections, "{row:?}\n{report}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// Builds (or finds up to date) the debug `muxgate` and `demo-upstream`
/// next to this crate's own binaries: `cargo test -p muxgate-bench` alone
/// builds only the bench crate's.
fn build_broker_binaries(root: &Path, bin: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "muxgate",
            "-p",
            "muxgate-backend",
        ])
        .arg("--target-dir")
        .arg(bin.parent().unwrap());
    if bin.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build of the broker binaries failed"
    );
    for name in ["muxgate", "demo-upstream"] {
        assert!(
            bin.join(name).exists(),
            "{name} is not in {}",
            bin.display()
        );
    }
}

/// A scratch directory for this run's report, results and charts.
fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("muxgate-bench-smoke-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The first of 7 consecutive free ports on 127.0.0.1, below the ephemeral
/// range, so that a smoke run never collides with a full bench/run.sh on the
/// default ports or with another smoke run; each `slot` (one per test)
/// starts its search elsewhere, as the tests run at once.
fn free_port_base(slot: u16) -> u16 {
    let start = 20_000 + ((std::process::id() % 1000) as u16 + slot * 500) % 1000 * 10;
    (0..1000)
        .map(|i| 20_000 + (start - 20_000 + i * 10) % 10_000)
        .find(|&base| (base..base + 7).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("7 free ports in 20000-29999")
}

fn read_results(file: &Path) -> HashMap<(String, String), f64> {
    let text = std::fs::read_to_string(file).expect("results.tsv");
    text.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 3, "results.tsv line {line:?}");
            let value = fields[2].parse().unwrap_or_else(|_| panic!("{line:?}"));
            ((fields[0].to_string(), fields[1].to_string()), value)
        })
        .collect()
}

/// The body rows of every Markdown table, split into trimmed cells.
fn table_rows(report: &str) -> Vec<Vec<String>> {
    report
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| path") && !l.starts_with("| ---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The file decodes as a PNG and is not a blank canvas.
fn check_png(file: &Path) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
    ));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut pixels = vec![0; reader.output_buffer_size().expect("PNG size")];
    let frame = reader.next_frame(&mut pixels).expect("PNG data");
    assert!(
        frame.width >= 400 && frame.height >= 300,
        "{}",
        file.display()
    );
    let drawn = pixels[..frame.buffer_size()]
        .iter()
        .filter(|&&b| b != 255)
        .count();
    assert!(drawn > 1000, "{} is blank", file.display());
}

/// A number, optionally followed by the range of the rounds it is the
/// median of: `14867.5 (13878-15857)`.
fn is_number_cell(cell: &str) -> bool {
    let (value, range) = match cell.split_once(" (") {
        Some((value, range)) => (value, Some(range)),
        None => (cell, None),
    };
    let number = |s: &str| s.parse::<f64>().is_ok();
    number(value)
        && range.is_none_or(|r| {
            r.strip_suffix(')')
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(lo, hi)| number(lo) && number(hi))
        })
}
