//! Multiplexed mode (`enable_direct_communication: false`): many client
//! sessions over a few shared upstream WebSockets, by `shared/mux-protocol.md`.
//!
//! - the frames and both encodings (§3, §4) are `muxgate_backend::protocol`,
//!   shared with the upstream-side library;
//! - [`pool`]: `pool_size` connections per upstream, hello first, reconnect
//!   with backoff and jitter, least-loaded binding (§1, §5.4);
//! - [`conn`]: one connection's reader/writer, dispatch to sessions,
//!   broadcast, slow consumers, hand-back of unwritten frames (§3, §5, §6);
//! - [`session`]: one client, its backpressure and re-binding (§2, §5, §6);
//! - [`inbox`]: what a connection hands a session, queue and signals.

pub(crate) mod conn;
pub(crate) mod inbox;
pub(crate) mod pool;
pub(crate) mod session;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::HeaderMap;
use muxgate_backend::protocol::Open;

/// The `open` frame of a new session: route, path with query, remote
/// address, the upstream's `forward_headers` (lower-case names, repeated
/// values joined with ", ") and the client's offered subprotocols.
pub(crate) fn open_frame(
    route: &str,
    path_and_query: String,
    remote: SocketAddr,
    headers: &HeaderMap,
    forward: &[crate::config::Text],
) -> Open {
    let mut forwarded = BTreeMap::new();
    for name in forward {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            forwarded.insert(name, values.join(", "));
        }
    }
    let subprotocols = muxgate_backend::protocol::offered_subprotocols(headers)
        .map(str::to_owned)
        .collect();
    Open {
        route: route.to_owned(),
        path: path_and_query,
        remote_addr: Some(remote.to_string()),
        headers: forwarded,
        subprotocols,
        claims: None,
        resumed: false,
    }
}
