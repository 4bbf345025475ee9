//! The values of `upstreams.yaml` that are strings in YAML and types in
//! the broker: a target's URL and `hash_on`. Parsed once, when the file is
//! validated, so the run time never meets a malformed one.

use std::fmt;

use http::header::{self, HeaderMap};

/// What `consistent_hash` hashes (`hash_on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashOn {
    Header(http::HeaderName),
    Query(String),
    Cookie(String),
    Ip,
}

impl HashOn {
    /// `header:NAME`, `query:NAME`, `cookie:NAME` or `ip`.
    pub(crate) fn parse(raw: &str) -> Result<HashOn, String> {
        let bad = || format!("{raw:?} is not header:NAME, query:NAME, cookie:NAME or ip");
        match raw.split_once(':') {
            None if raw == "ip" => Ok(HashOn::Ip),
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .map(HashOn::Header)
                .map_err(|_| bad()),
            Some(("query", name)) if !name.is_empty() => Ok(HashOn::Query(name.to_owned())),
            Some(("cookie", name)) if !name.is_empty() => Ok(HashOn::Cookie(name.to_owned())),
            _ => Err(bad()),
        }
    }

    /// The key of a request; the client's address when the header, query
    /// parameter or cookie is absent.
    pub(crate) fn key(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        ip: std::net::IpAddr,
    ) -> Vec<u8> {
        let found: Option<&str> = match self {
            HashOn::Ip => None,
            HashOn::Header(name) => headers.get(name).and_then(|v| v.to_str().ok()),
            HashOn::Query(name) => query.and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v)
            }),
            HashOn::Cookie(name) => headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v),
        };
        match found {
            Some(v) => v.as_bytes().to_vec(),
            None => ip.to_string().into_bytes(),
        }
    }
}

/// `ws://host:port` of a target, checked once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetUrl {
    secure: bool,
    /// `host:port`, as written (with the default port filled in).
    authority: String,
}

impl TargetUrl {
    /// Parses `ws://host[:port][/]` or `wss://...`; the path comes from the
    /// route's `internal_path`, so the URL must not carry one of its own.
    pub(crate) fn parse(raw: &str) -> Result<TargetUrl, String> {
        let uri: http::Uri = raw
            .parse()
            .map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("URL {raw:?} must start with ws:// or wss://")),
        };
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| format!("URL {raw:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("URL {raw:?} must not carry credentials"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "URL {raw:?} must not have a path or query: the route's internal_path is used"
            ));
        }
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        Ok(TargetUrl {
            secure,
            authority: format!("{}:{port}", authority.host()),
        })
    }

    pub(crate) fn is_secure(&self) -> bool {
        self.secure
    }

    /// `host:port`, for connecting and for the `Host` header.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// The host, for TLS server-name verification.
    pub(crate) fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(&*self.authority, |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.secure { "wss" } else { "ws" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{self, HeaderMap, HeaderValue};

    #[test]
    fn target_urls() {
        let u = TargetUrl::parse("ws://127.0.0.1:3000").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:3000");
        assert_eq!(u.to_string(), "ws://127.0.0.1:3000");
        assert_eq!(
            TargetUrl::parse("wss://example.com/").unwrap().authority(),
            "example.com:443"
        );
        assert!(TargetUrl::parse("http://x:1")
            .unwrap_err()
            .contains("ws:// or wss://"));
        assert!(TargetUrl::parse("ws://x:1/chat")
            .unwrap_err()
            .contains("internal_path"));
        assert!(TargetUrl::parse("ws:///").is_err());
    }

    #[test]
    fn hash_keys_come_from_header_query_cookie_or_ip() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; sid=xyz"));
        let ip: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        let key = |spec: &str, q: Option<&str>| HashOn::parse(spec).unwrap().key(&h, q, ip);
        assert_eq!(key("header:x-user-id", None), b"alice");
        assert_eq!(key("query:room", Some("x=1&room=7")), b"7");
        assert_eq!(key("cookie:sid", None), b"xyz");
        assert_eq!(key("ip", None), b"10.0.0.9");
        assert_eq!(
            key("header:x-absent", None),
            b"10.0.0.9",
            "absent: the address"
        );
        assert!(HashOn::parse("body:x").is_err());
        assert!(HashOn::parse("query:").is_err());
    }
}
