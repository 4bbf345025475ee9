//! The broker assembled: [`Broker::bind`] builds the run-time objects from a
//! validated config and binds both listeners (so callers, tests among them,
//! learn the real addresses of port-0 binds before connecting), and
//! [`Broker::run`] serves until the shutdown signal, then drains.
//!
//! This module owns the top-level tasks; session tasks belong to the
//! [`Shutdown`] handle's tracker.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::accept::{BalancedListener, Turns};
use crate::admin;
use crate::config::Config;
use crate::config::Mode;
use crate::event_loops::{ClientLoops, ServeFuture};
use crate::handshake;
use crate::http1;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::mux::pool::MuxPool;
use crate::routing::RouteTable;
use crate::session::SessionManager;
use crate::shutdown::{DrainOutcome, Shutdown};
use crate::upstream::Upstream;

/// State shared by every handler.
pub struct AppState {
    pub routes: RouteTable,
    /// The mux pool of each multiplexed upstream, by name.
    pub pools: HashMap<Arc<str>, Arc<MuxPool>>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub limits: Arc<ConnectionLimits>,
    pub sessions: Arc<SessionManager>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Clients connect with TLS (`wss://`): `X-Forwarded-Proto: https`.
    pub secure: bool,
}

/// `server`'s bounds on a client connection before its upgrade.
#[derive(Clone, Copy)]
struct ClientLimits {
    /// `header_read_timeout`.
    header_read_timeout: Duration,
    /// `max_request_head_size`, in bytes.
    max_request_head: usize,
}

/// A broker with both listeners bound, not yet serving.
pub struct Broker {
    state: Arc<AppState>,
    client: TcpListener,
    /// The other `server.workers - 1` loops serving `client`.
    loops: ClientLoops,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// What a client connection may take before its upgrade.
    client_limits: ClientLimits,
    admin: TcpListener,
    grace: Duration,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {which} listener {addr}: {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("server.tls: {0}")]
    Tls(String),
    #[error("server.workers: {0}")]
    Loops(#[source] io::Error),
}

impl Broker {
    /// Builds the broker from a validated config and binds its listeners.
    pub async fn bind(config: Config) -> Result<Broker, StartError> {
        let metrics = Arc::new(Metrics::new());
        let shutdown = Shutdown::new();
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .cloned()
            .map(|u| Arc::new(Upstream::new(u, config.jwt.as_ref())))
            .collect();
        let bind = |which: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    which,
                    addr,
                    source,
                })
        };
        let tls = match &config.server.tls {
            Some(t) => Some(
                crate::tls::server_config(&t.cert_file, &t.key_file).map_err(StartError::Tls)?,
            ),
            None => None,
        };
        let client = bind("client", config.server.listen).await?;
        let admin = bind("admin", config.server.admin_listen).await?;
        let loops = ClientLoops::spawn(&client, config.server.event_loops().get() - 1)
            .await
            .map_err(StartError::Loops)?;
        // Identifies this broker process in every mux `hello`.
        let instance = uuid::Uuid::new_v4();
        let pools = upstreams
            .iter()
            .filter(|u| u.mode() == Mode::Multiplexed)
            .map(|u| {
                let pool = MuxPool::start(
                    Arc::clone(u),
                    Arc::clone(&metrics),
                    instance,
                    &shutdown,
                    loops.handles(),
                );
                (Arc::clone(&u.name), pool)
            })
            .collect();
        for upstream in &upstreams {
            crate::upstream::probe::start(upstream, &metrics, &shutdown);
        }
        let state = Arc::new(AppState {
            routes: RouteTable::new(&upstreams),
            pools,
            upstreams,
            limits: ConnectionLimits::new(
                config.server.max_connections,
                config.server.max_connections_per_ip,
            ),
            sessions: SessionManager::new(Arc::clone(&metrics), shutdown.clone()),
            metrics,
            shutdown,
            secure: tls.is_some(),
        });
        Ok(Broker {
            state,
            client,
            loops,
            tls,
            client_limits: ClientLimits {
                header_read_timeout: config.server.header_read_timeout,
                max_request_head: config.server.max_request_head_size.bytes(),
            },
            admin,
            grace: config.server.shutdown_grace,
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
            client,
            mut loops,
            tls,
            client_limits,
            admin,
            grace,
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
        let client_server = tokio::spawn(serve(first, 0, tls.clone(), Arc::clone(&state)));
        loops.serve(|index| {
            let (tls, state, turns, queue) =
                (tls.clone(), Arc::clone(&state), Arc::clone(&turns), queue());
            // Called on the loop's thread, with the socket registered there.
            Box::new(move |tcp| {
                let listener = BalancedListener::new(tcp, index, turns, queue);
                serve(listener, index, tls, state)
            })
        });
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_server = tokio::spawn(async move {
            axum::serve(admin, admin::router(state))
                .with_graceful_shutdown(async move {
                    let _ = admin_stopped.await;
                })
                .await
        });
        info!(%client_addr, %admin_addr, event_loops = loops.len() + 1, "muxgate listening");

        tokio::select! {
            _ = signal => {}
            _ = shutdown.begun() => {}
        }
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
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = client_server.await;
            loops.accepting_stopped().await;
        })
        .await;
        loops.stop().await;
        let _ = admin_stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_server).await;
        outcome
    }
}

/// Serves client handshakes on `listener` until shutdown begins; one call
/// per event loop, `index` being the loop's.
fn serve_clients(
    listener: BalancedListener,
    index: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    client: ClientLimits,
    state: Arc<AppState>,
) -> ServeFuture {
    let accepted = state.metrics.accepted_on(index);
    let limits = http1::Limits {
        header_read_timeout: client.header_read_timeout,
        header_timeouts: state.metrics.header_timeouts_on(index),
        max_head: client.max_request_head,
        heads_too_large: state.metrics.heads_too_large(),
    };
    let shutdown = state.shutdown.clone();
    let stopped = async move { shutdown.begun().await };
    let router = Router::new().fallback(handshake::handle).with_state(state);
    Box::pin(async move {
        match tls {
            None => {
                let listener = listener.tap_io(move |tcp| {
                    accepted.inc();
                    let _ = tcp.set_nodelay(true);
                });
                http1::serve(listener, router, limits, stopped).await
            }
            Some(config) => {
                let listener =
                    crate::tls::TlsListener::new(listener, config).tap_io(move |_| accepted.inc());
                http1::serve(listener, router, limits, stopped).await
            }
        }
    })
}
