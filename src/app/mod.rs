//! The broker assembled: [`Broker::bind`] builds the run-time objects from a
//! validated config and binds both listeners (so callers, tests among them,
//! learn the real addresses of port-0 binds before connecting), and
//! [`Broker::run`] serves until the shutdown signal, then drains.
//!
//! Every task runs on the [`Shutdown`] handle's one tracker and stops
//! through its one tree of tokens; this module spawns the top-level ones
//! (the client servers, the admin listener) and runs the shutdown in order:
//! stop accepting and turn `/readyz` 503, close every session with 1001 and
//! drain them up to `shutdown_grace`, then stop the listeners and the event
//! loops, and the admin listener last.
//!
//! # A restart's handover
//!
//! With `server.reuse_port` both listeners are bound with `SO_REUSEPORT`,
//! so that a new process can bind the same ports while this one runs; the
//! kernel then spreads new connections over both. SIGTERM to the old one
//! must then not refuse what the kernel gave it, so its shutdown has a
//! first step (the *handover*): its client listener closes at once (each
//! loop first takes what the socket's queue holds, see
//! `transport::accept`), from which moment the kernel gives every new
//! connection to the other processes on the port; `/readyz` turns 503;
//! and the connections it had taken complete their upgrades as usual, for
//! up to `HAND_OVER_LIMIT`. Only then do its sessions get 1001 and drain,
//! and their clients reconnect to the new process. Closing at once, rather
//! than accepting a while longer after `/readyz` turned 503, is the point:
//! while the socket is open the kernel keeps giving it connections, and
//! every one in its queue at the close would be reset.
//!
//! What a running broker's config can become is `reload`'s: a new
//! `snapshot` swapped in whole, its `changes` logged; `watch` starts the
//! reloads that SIGHUP and file changes ask for.

pub(crate) mod admin;
mod changes;
mod clients;
mod reload;
mod snapshot;
pub(crate) mod state;
mod watch;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
#[cfg(unix)]
use tokio::net::TcpSocket;
use tracing::{info, warn};

use clients::{serve_clients, ClientLimits};
use snapshot::{Runtime, Snapshot};
use state::AppState;

use crate::config::Config;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::session::SessionManager;
use crate::shutdown::{DrainOutcome, Shutdown};
use crate::transport::accept::{BalancedListener, Turns};
use crate::transport::event_loops::ClientLoops;
use crate::transport::tls::{ServerTls, TlsError};

/// How long, in a handover, the connections the closed client listener had
/// taken may take to complete their upgrades (or other requests) before
/// the drain begins; one that has not by then is answered as during any
/// shutdown (503). A client sends its upgrade as soon as it has connected,
/// so this is reached only by one that sends nothing, or by a handshake
/// that waits for its upstream.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(5);

/// The accept queue of a listener bound with `SO_REUSEPORT`. Each process
/// of the port has its own queue, and none can take from another's, so
/// each must take a whole burst on its own: the clients of a process that
/// restarts (1001 to every session) reconnect at once, all to the others.
/// 1,024 (mio's, and so tokio's, `bind` takes std's 128) rides out such a
/// burst where 128 would drop SYNs (a second's wait for the client's
/// retry); the kernel caps it at `net.core.somaxconn` (4,096 by default).
#[cfg(unix)]
const SHARED_BACKLOG: u32 = 1024;

/// A broker with both listeners bound, not yet serving.
pub struct Broker {
    state: Arc<AppState>,
    /// `server.reuse_port`, as bound: a SIGTERM hands over first.
    reuse_port: bool,
    client: TcpListener,
    /// The other `server.workers - 1` loops serving `client`.
    loops: ClientLoops,
    tls: Option<ServerTls>,
    /// What a client connection may take before its upgrade.
    client_limits: ClientLimits,
    admin: TcpListener,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The client or the admin listener could not be bound.
    #[error("binding {which} listener {addr}: {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The listener's TLS settings could not be built from its PEM files.
    #[error("server.tls: {0}")]
    Tls(#[source] TlsError),
    /// An event loop's thread, runtime or listener could not be had.
    #[error("server.workers: {0}")]
    Loops(#[source] io::Error),
}

impl Broker {
    /// Builds the broker from a validated config and binds its listeners.
    pub async fn bind(config: Config) -> Result<Broker, StartError> {
        let metrics = Arc::new(Metrics::new());
        metrics.config_applied(config.generation);
        let shutdown = Shutdown::new();
        let reuse_port = config.server.reuse_port;
        let bind = |which: &'static str, addr: SocketAddr| async move {
            let bound = if reuse_port {
                bind_shared(addr)
            } else {
                TcpListener::bind(addr).await
            };
            bound.map_err(|source| StartError::Bind {
                which,
                addr,
                source,
            })
        };
        let http2 = config.server.serves_http2();
        let tls = match &config.server.tls {
            Some(t) => Some(Arc::new(arc_swap::ArcSwap::new(
                crate::transport::tls::server_config(&t.cert_file, &t.key_file, http2)
                    .map_err(StartError::Tls)?,
            ))),
            None => None,
        };
        let client = bind("client", config.server.listen).await?;
        let admin = bind("admin", config.server.admin_listen).await?;
        let loops = ClientLoops::spawn(&client, config.server.event_loops().get() - 1, &shutdown)
            .await
            .map_err(StartError::Loops)?;
        let runtime = Runtime {
            metrics: Arc::clone(&metrics),
            shutdown: shutdown.clone(),
            instance: uuid::Uuid::new_v4(),
            loops: loops.handles().to_vec(),
        };
        let client_limits = ClientLimits {
            header_read_timeout: config.server.header_read_timeout,
            max_request_head: config.server.max_request_head_size.bytes(),
            http2: http2.then_some(crate::transport::http2::Settings {
                max_concurrent_streams: config.server.http2_max_concurrent_streams,
            }),
        };
        let limits = ConnectionLimits::new(
            config.server.max_connections,
            config.server.max_connections_per_ip,
        );
        let state = Arc::new(AppState {
            current: arc_swap::ArcSwap::from_pointee(Snapshot::first(config, &runtime)),
            runtime,
            limits,
            sessions: SessionManager::new(Arc::clone(&metrics), shutdown.clone()),
            metrics,
            shutdown,
            tls: tls.clone(),
            http2,
            changing: tokio::sync::Mutex::new(()),
        });
        Ok(Broker {
            state,
            reuse_port,
            client,
            loops,
            tls,
            client_limits,
            admin,
        })
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener")
    }

    /// The handle that begins shutdown (for embedding and tests).
    pub fn shutdown(&self) -> Shutdown {
        self.state.shutdown.clone()
    }

    /// Serves until `signal` resolves (or shutdown is begun through the
    /// handle), then stops accepting, closes every session with 1001 and
    /// waits up to `shutdown_grace` for them.
    pub async fn run(self, signal: impl Future<Output = ()>) -> DrainOutcome {
        let Broker {
            state,
            reuse_port,
            client,
            mut loops,
            tls,
            client_limits,
            admin,
        } = self;
        let client_addr = client.local_addr().expect("bound listener");
        let admin_addr = admin.local_addr().expect("bound listener");
        let shutdown = state.shutdown.clone();

        // Every loop's listener takes its turns from the one counter; the
        // hand-off queues go by loop index, this runtime's (loop 0) first.
        let (turns, handed) = Turns::new(loops.len() + 1);
        let mut handed = handed.into_iter();
        let mut queue = move || handed.next().expect("a hand-off queue per loop");
        let serve = move |listener, index, tls, state| {
            serve_clients(listener, index, tls, client_limits, state)
        };
        let first = BalancedListener::new(client, 0, Arc::clone(&turns), queue());
        shutdown
            .listeners()
            .spawn(serve(first, 0, tls.clone(), Arc::clone(&state)));
        loops.serve(|index| {
            let (tls, state, turns, queue) =
                (tls.clone(), Arc::clone(&state), Arc::clone(&turns), queue());
            // Called on the loop's thread, with the socket registered there.
            Box::new(move |tcp| {
                let listener = BalancedListener::new(tcp, index, turns, queue);
                serve(listener, index, tls, state)
            })
        });
        // Serves through the drain (`/readyz` says 503 meanwhile), until
        // the root is cancelled.
        let admin_stop = shutdown.root_token();
        watch::start(&state);
        let admin_state = Arc::clone(&state);
        let admin_server = shutdown.spawn_last(async move {
            axum::serve(admin, admin::router(admin_state))
                .with_graceful_shutdown(admin_stop.cancelled_owned())
                .await
        });
        info!(%client_addr, %admin_addr, event_loops = loops.len() + 1, "muxgate listening");

        tokio::select! {
            _ = signal => {
                if reuse_port {
                    hand_over(&shutdown).await;
                }
            }
            _ = shutdown.begun() => {}
        }
        // The grace the config applied last says.
        let grace = state.current.load().config.server.shutdown_grace;
        info!(
            sessions = shutdown.running(),
            grace = %humantime::format_duration(grace),
            "draining sessions"
        );
        let outcome = shutdown.drain(grace).await;
        match outcome {
            DrainOutcome::Drained => info!("all sessions closed"),
            DrainOutcome::TimedOut { remaining } => {
                warn!(
                    remaining,
                    "shutdown_grace ran out; aborting remaining sessions"
                )
            }
        }
        // Idle HTTP connections are closed by the graceful shutdown; give
        // a stuck one no longer than what is left of the budget.
        shutdown.listeners_stopped(Duration::from_secs(1)).await;
        // Then the loops end, and with them whatever they still hold; a
        // client connection still open on this runtime is dropped too.
        shutdown.release();
        loops.stop().await;
        // The admin listener last.
        shutdown.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_server).await;
        outcome
    }
}

/// `addr` bound with `SO_REUSEPORT`, so that other muxgate processes (of
/// the same user: the kernel allows no other) can listen on it too, and
/// `SO_REUSEADDR`, as tokio's `bind` sets it.
#[cfg(unix)]
fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(SHARED_BACKLOG)
}

#[cfg(not(unix))]
fn bind_shared(_addr: SocketAddr) -> io::Result<TcpListener> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "server.reuse_port needs SO_REUSEPORT, which only Unix systems have",
    ))
}

/// A restart's first step (see the module docs): the client listener
/// closes and `/readyz` turns 503 while sessions go on, and the
/// connections it had taken complete their upgrades, for up to
/// [`HAND_OVER_LIMIT`].
async fn hand_over(shutdown: &Shutdown) {
    info!("handing over: closing the client listener, finishing the handshakes it took");
    shutdown.hand_over();
    if shutdown.listeners_stopped(HAND_OVER_LIMIT).await {
        info!("client listener closed, its handshakes done");
    } else {
        warn!(
            limit = %humantime::format_duration(HAND_OVER_LIMIT),
            "client connections still without an upgrade after the handover's limit"
        );
    }
}
