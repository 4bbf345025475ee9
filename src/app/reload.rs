//! Changing a running broker: a reload of the config file (SIGHUP,
//! `POST /admin/reload`, `server.watch_config`), a live mode change
//! (`PUT /admin/upstreams/{name}/mode`) and an operator's target drain.
//!
//! A reload reads and validates the whole file exactly as `muxgate check`
//! does; a file with any problem changes nothing. A good one becomes the
//! next [`Snapshot`] (see that module for the diff), swapped in whole;
//! then what the change takes away is let go: retired pools end once their
//! last session has, replaced probes stop, and the sessions whose upstream,
//! route or (direct mode) target is gone drain, up to `drain_timeout`.
//! Mux sessions on a removed target are not drained: their pool moves its
//! connections off it, re-binding them (`crate::mux::pool`).
//!
//! A mode change is the same path with the file's config and one more
//! override, which the next reload clears (the file is the source of truth).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::changes::{Changes, Kind};
use super::state::AppState;
use crate::config::{ConfigError, Mode};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The broker was started from a config given as text.
    #[error("the broker was not started from a config file")]
    NoFile,
    /// The file could not be read, or has problems.
    #[error(transparent)]
    Rejected(#[from] ConfigError),
}

/// Why a live change was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LiveChangeError {
    #[error("no upstream named {0:?}")]
    NoUpstream(String),
    #[error("upstream {upstream:?} has no target {target:?}")]
    NoTarget { upstream: String, target: String },
}

impl AppState {
    /// Reloads the config file (`trigger` says what asked, for the log).
    pub(crate) async fn reload(&self, trigger: &'static str) -> Result<Changes, ReloadError> {
        let _one = self.changing.lock().await;
        let current = self.current.load_full();
        let Some(path) = current.config.source.clone() else {
            return Err(ReloadError::NoFile);
        };
        // Off the event loop: a slow disk must not stall sessions.
        let loaded = tokio::task::spawn_blocking(move || crate::config::load_file(&path))
            .await
            .expect("config loading does not panic");
        let config = match loaded {
            Ok(config) => config,
            Err(error) => {
                self.metrics.config_reloaded("rejected");
                for line in error.to_string().lines() {
                    warn!(
                        trigger,
                        problem = line,
                        "config reload rejected; the running config stays"
                    );
                }
                return Err(error.into());
            }
        };
        let generation = config.generation;
        info!(trigger, generation = %format_args!("{generation:012x}"), "reloading config");
        let changes = self.apply(config, BTreeMap::new());
        self.metrics.config_reloaded("applied");
        changes.log(generation);
        Ok(changes)
    }

    /// Sets `upstream`'s mode until the next reload (`PUT .../mode`).
    pub(crate) async fn set_mode(
        &self,
        upstream: &str,
        mode: Mode,
    ) -> Result<Changes, LiveChangeError> {
        let _one = self.changing.lock().await;
        let current = self.current.load_full();
        let Some(file) = current
            .config
            .upstreams
            .iter()
            .find(|u| &*u.name == upstream)
        else {
            return Err(LiveChangeError::NoUpstream(upstream.to_owned()));
        };
        let mut overrides = current.overrides.clone();
        if file.mode() == mode {
            overrides.remove(upstream);
        } else {
            overrides.insert(upstream.to_owned(), mode);
        }
        let changes = self.apply(current.config.clone(), overrides);
        info!(
            upstream,
            mode = mode.as_str(),
            "mode set by the admin API until the next reload"
        );
        changes.log(current.config.generation);
        Ok(changes)
    }

    /// Takes a target out of rotation by hand (`drained`), or puts it
    /// back: pools move their connections off it, and its direct sessions
    /// drain; undraining stops their drain. Returns the sessions affected.
    pub(crate) fn drain_target(
        &self,
        upstream: &str,
        target: &str,
        drained: bool,
    ) -> Result<usize, LiveChangeError> {
        let current = self.current.load();
        let no_target = || LiveChangeError::NoTarget {
            upstream: upstream.to_owned(),
            target: target.to_owned(),
        };
        let u = current
            .upstream(upstream)
            .ok_or_else(|| LiveChangeError::NoUpstream(upstream.to_owned()))?;
        let t = u.target(target).ok_or_else(no_target)?;
        t.set_drained(drained);
        let on_it = |s: &crate::session::SessionHandle| {
            *s.upstream == *upstream && s.target.as_deref() == Some(&*t.label)
        };
        let sessions = if drained {
            self.sessions
                .drain(on_it, current.config.server.drain_timeout)
        } else {
            self.sessions.undrain(on_it)
        };
        info!(upstream, target_url = %t.label, drained, sessions, "target {} by the admin API", if drained { "drained" } else { "undrained" });
        Ok(sessions)
    }

    /// Reads the listener's certificate and key again (a renewal keeps the
    /// paths and replaces the files), for the handshakes from now on. A
    /// listener started without TLS stays without, and the other way round.
    fn reread_tls(&self, config: Option<&crate::config::TlsConfig>) {
        let (Some(running), Some(config)) = (&self.tls, config) else {
            return;
        };
        match crate::transport::tls::server_config(&config.cert_file, &config.key_file, self.http2)
        {
            Ok(next) => {
                running.store(next);
                info!(cert_file = %config.cert_file, "TLS certificate and key read again for new handshakes");
            }
            // Validation read them a moment ago: they changed since.
            Err(e) => warn!(error = %e, "TLS certificate or key unreadable; the running ones stay"),
        }
    }

    /// Builds the next snapshot from `config` and `overrides`, swaps it in
    /// and lets go of what it took away. Called with `changing` held.
    fn apply(&self, config: crate::config::Config, overrides: BTreeMap<String, Mode>) -> Changes {
        let generation = config.generation;
        let server = config.server.clone();
        let current = self.current.load_full();
        let (next, mut changes) = current.next(config, overrides, &self.runtime);
        self.current.store(Arc::new(next));
        self.metrics.config_applied(generation);
        self.limits
            .set(server.max_connections, server.max_connections_per_ip);
        self.reread_tls(server.tls.as_ref());
        for probe in changes.stopped_probes.drain(..) {
            probe.cancel();
        }
        for pool in changes.retired_pools.drain(..) {
            pool.retire();
        }
        let timeout = server.drain_timeout;
        for u in &mut changes.upstreams {
            let name = Arc::clone(&u.name);
            for target in &u.targets_removed {
                self.metrics.target_removed(&name, target);
            }
            u.sessions_draining = match u.change {
                Kind::Removed => self.sessions.drain(|s| s.upstream == name, timeout),
                Kind::Changed if !(u.routes_removed.is_empty() && u.targets_removed.is_empty()) => {
                    let (routes, targets) = (&u.routes_removed, &u.targets_removed);
                    self.sessions.drain(
                        |s| {
                            s.upstream == name
                                && (routes.contains(&s.route)
                                    || s.mode == Mode::Direct
                                        && s.target.as_ref().is_some_and(|t| targets.contains(t)))
                        },
                        timeout,
                    )
                }
                _ => 0,
            };
        }
        changes
    }
}
