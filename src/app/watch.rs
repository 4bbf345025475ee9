//! What starts a reload besides `POST /admin/reload`: SIGHUP, and, while
//! `server.watch_config` is on, a change of the config file.
//!
//! The file's directory is watched rather than the file, because editors
//! and Kubernetes replace a file (a rename, or a symlink swapped under a
//! ConfigMap's `..data`) instead of writing into it. Writes come in
//! bursts: after an event the watcher waits for a quiet
//! [`WATCH_DEBOUNCE`](crate::config::WATCH_DEBOUNCE), then reloads only if
//! the file's text is not the one applied (its generation differs), so a
//! touched neighbour or a save of the same text does nothing.
//!
//! Both tasks belong to the shutdown tracker and end when shutdown begins.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::state::AppState;
use crate::config::WATCH_DEBOUNCE;

/// Starts the SIGHUP and file watchers of a broker started from a file.
pub(super) fn start(state: &Arc<AppState>) {
    let Some(path) = state.current.load().config.source.clone() else {
        return;
    };
    start_sighup(state);
    start_file_watch(state, path);
}

fn start_sighup(state: &Arc<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
                return;
            }
        };
        let stop = state.shutdown.token();
        let state = Arc::clone(state);
        state.shutdown.clone().spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                // A rejected reload logs its problems itself.
                let _ = state.reload("SIGHUP").await;
            }
        });
    }
}

fn start_file_watch(state: &Arc<AppState>, path: PathBuf) {
    // One pending wake-up is all it takes: a burst of events while one is
    // pending is the same change.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        use notify::Watcher;
        w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the config file's directory; watch_config is off");
            return;
        }
    };
    let stop = state.shutdown.token();
    let state = Arc::clone(state);
    state.shutdown.clone().spawn(async move {
        // Lives as long as the task: dropping it stops the watching.
        let _watcher = watcher;
        // A text rejected once is not tried again until it changes.
        let mut tried = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            // Quiet for WATCH_DEBOUNCE since the last event.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(WATCH_DEBOUNCE) => break,
                    _ = rx.recv() => {}
                }
            }
            let current = state.current.load_full();
            if !current.config.server.watch_config {
                continue;
            }
            let file = path.clone();
            let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(file)).await;
            let text = match read.expect("reading a file does not panic") {
                Ok(t) => t,
                // Gone for a moment between a delete and a create: the
                // create's event comes next.
                Err(e) => {
                    debug!(file = %path.display(), error = %e, "config file unreadable after a change");
                    continue;
                }
            };
            let generation = crate::config::generation_of(&text);
            if generation == current.config.generation || tried == Some(generation) {
                continue;
            }
            tried = Some(generation);
            let _ = state.reload("watch_config").await;
        }
    });
}
