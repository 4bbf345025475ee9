//! The route table: a client's request path (`external_path`, matched
//! exactly) to its upstream and the `internal_path` it is rewritten to.
//! Built once from the validated config and shared read-only.

use std::collections::HashMap;
use std::sync::Arc;

use crate::upstream::Upstream;

/// Where one external path leads.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub external_path: Arc<str>,
    pub internal_path: Arc<str>,
    pub upstream: Arc<Upstream>,
}

impl Route {
    /// The path and query to request from the target: `internal_path`
    /// with the client's query string kept.
    pub(crate) fn upstream_path(&self, query: Option<&str>) -> String {
        match query {
            Some(q) => format!("{}?{q}", self.internal_path),
            None => self.internal_path.to_string(),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: HashMap<Arc<str>, Route>,
}

impl RouteTable {
    pub(crate) fn new(upstreams: &[Arc<Upstream>]) -> RouteTable {
        let mut routes = HashMap::new();
        for upstream in upstreams {
            for r in &upstream.config.routes {
                let external: Arc<str> = Arc::from(r.external_path.as_ref());
                routes.insert(
                    Arc::clone(&external),
                    Route {
                        external_path: external,
                        internal_path: Arc::from(r.internal_path.as_ref()),
                        upstream: Arc::clone(upstream),
                    },
                );
            }
        }
        RouteTable { routes }
    }

    pub(crate) fn lookup(&self, path: &str) -> Option<&Route> {
        self.routes.get(path)
    }
}
