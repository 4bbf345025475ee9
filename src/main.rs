//! The `muxgate` command: run the broker, or check a config file.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Exit status for a bad config (EX_USAGE of sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Exit status when a listener cannot be bound (EX_UNAVAILABLE).
const EXIT_START: u8 = 69;
/// Where `--demo` starts the bundled demo upstream (the shipped config's target).
const DEMO_LISTEN: &str = "127.0.0.1:3000";

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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
