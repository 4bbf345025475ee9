//! `api_key`: the handshake must carry a known key, in a header (default
//! `x-api-key`) or a query parameter. Keys come from a file (one per line,
//! `#` comments) and/or an environment variable (comma-separated), never
//! from the config itself; they are compared in constant time.

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::{BuildError, HandshakeCtx, Plugin, Rejection};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    #[serde(default = "default_header")]
    pub header: String,
    /// A query parameter that may carry the key instead.
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub keys_file: Option<String>,
    /// The name of an environment variable holding comma-separated keys.
    #[serde(default)]
    pub keys_env: Option<String>,
}

fn default_header() -> String {
    "x-api-key".into()
}

pub struct ApiKeyPlugin {
    header: http::HeaderName,
    query: Option<String>,
    keys: Vec<Vec<u8>>,
}

impl ApiKeyPlugin {
    pub fn build(s: &ApiKeySettings) -> Result<Self, BuildError> {
        let header = http::HeaderName::from_bytes(s.header.as_bytes()).map_err(|_| {
            BuildError::new(
                "settings.header",
                format!("{:?} is not a header name", s.header),
            )
        })?;
        let mut keys = Vec::new();
        if let Some(file) = &s.keys_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| BuildError::new("settings.keys_file", format!("{file}: {e}")))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        if let Some(var) = &s.keys_env {
            let value = std::env::var(var).map_err(|_| {
                BuildError::new(
                    "settings.keys_env",
                    format!("environment variable `{var}` is not set"),
                )
            })?;
            keys.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| k.as_bytes().to_vec()),
            );
        }
        if keys.is_empty() {
            return Err(BuildError::new(
                "settings",
                "no keys: give keys_file and/or keys_env with at least one key",
            ));
        }
        Ok(ApiKeyPlugin {
            header,
            query: s.query.clone(),
            keys,
        })
    }

    fn known(&self, candidate: &[u8]) -> bool {
        // Every key is compared, so the time taken says nothing of which matched.
        self.keys
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| {
                acc | k.as_slice().ct_eq(candidate)
            })
            .into()
    }
}

impl Plugin for ApiKeyPlugin {
    fn name(&self) -> &'static str {
        "api_key"
    }

    fn on_handshake(&self, ctx: &mut HandshakeCtx<'_>) -> Result<(), Rejection> {
        let from_header = ctx.headers.get(&self.header).map(|v| v.as_bytes());
        let from_query = self.query.as_deref().and_then(|name| {
            ctx.query.and_then(|q| {
                q.split('&')
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_bytes())
            })
        });
        match from_header.or(from_query) {
            Some(key) if self.known(key) => Ok(()),
            found => Err(Rejection {
                status: http::StatusCode::UNAUTHORIZED,
                message: "invalid or missing API key",
                detail: if found.is_some() {
                    "unknown API key".into()
                } else {
                    format!("no `{}` header", self.header)
                },
                headers: vec![],
                reason: "api_key",
            }),
        }
    }
}
