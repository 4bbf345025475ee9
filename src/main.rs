//! The `muxgate` command: run the broker, check a config file, or probe a
//! running broker's health endpoint.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Exit status for a bad config (EX_USAGE of sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Exit status when a listener cannot be bound (EX_UNAVAILABLE).
const EXIT_START: u8 = 69;
/// Where `--demo` starts the bundled demo upstream (the shipped config's target).
const DEMO_LISTEN: &str = "127.0.0.1:3000";
/// What `muxgate health` asks by default: the admin listener's liveness
/// endpoint at its default port, from inside the broker's host or container.
const HEALTH_URL: &str = "http://127.0.0.1:9090/healthz";
/// `muxgate health` gives up on the connect, and then on the whole
/// exchange, after this long.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(name = "muxgate", version, about = "A WebSocket broker")]
struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "upstreams.yaml")]
    config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// Log filter: a level (info, debug ...) or tracing directives.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Also start the bundled demo echo upstream on this address.
    #[arg(long, num_args = 0..=1, default_missing_value = DEMO_LISTEN)]
    demo: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and exit: 0 when valid, 64 with the errors.
    Check,
    /// GET an HTTP URL (the admin listener's /healthz by default) and exit 0
    /// on a 200, 1 otherwise: a health check for images without curl.
    /// Reads no config file.
    Health {
        /// A plain http:// URL.
        #[arg(long, default_value = HEALTH_URL)]
        url: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Health { url }) = &cli.command {
        return match health(url) {
            Ok(status) => {
                println!("{url}: {status}");
                ExitCode::SUCCESS
            }
            Err(why) => {
                eprintln!("muxgate health: {url}: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = match EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("muxgate: --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cli.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }

    let config = match muxgate::config::load_file(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }

    // The first of the broker's event loops (see muxgate::event_loops); it
    // also runs the admin listener, the mux pools and the probes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        // Not one of the broker's tasks: the demo upstream outlives the
        // broker's drain, and is stopped and joined after it.
        let demo_stop = tokio_util::sync::CancellationToken::new();
        let demo = match cli.demo {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(tokio::spawn(muxgate_backend::demo::serve(
                    listener,
                    demo_stop.clone(),
                ))),
                Err(e) => {
                    eprintln!("muxgate: binding demo upstream {addr}: {e}");
                    return ExitCode::from(EXIT_START);
                }
            },
            None => None,
        };
        let broker = match muxgate::Broker::bind(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("muxgate: {e}");
                return ExitCode::from(EXIT_START);
            }
        };
        broker.run(muxgate::shutdown::signal()).await;
        demo_stop.cancel();
        if let Some(demo) = demo {
            let _ = demo.await;
        }
        ExitCode::SUCCESS
    })
}

/// One blocking HTTP/1.1 GET of `url`: `Ok` with the status line on a 200,
/// `Err` with the reason otherwise. Plain TCP from std (the probe must work
/// in an image with no shell and no curl), no TLS, no redirects.
fn health(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err("no host in the URL".into());
    }
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| format!("resolving {target}: {e}"))?
        .collect();
    let mut last = format!("{target}: no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, HEALTH_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let io = |e: std::io::Error| format!("{e}");
    stream.set_read_timeout(Some(HEALTH_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(HEALTH_TIMEOUT)).map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: muxgate-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    // The status line is all that is needed; read until its end (or 1 KiB).
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").trim_end();
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/1.") => Ok(line.to_string()),
        (Some(v), Some(_)) if v.starts_with("HTTP/1.") => Err(format!("answered {line:?}")),
        _ => Err(format!("not an HTTP response: {line:?}")),
    }
}
