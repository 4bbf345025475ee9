//! `rate_limit`: token buckets (governor's GCRA) on messages and on bytes
//! per second, with a burst, kept per session, per client address or per
//! JWT subject. Over the limit, the sender gets TrustGate's JSON error reply
//! `{"error": "rate limit exceeded", "retry_after": <seconds>}` (the message
//! is dropped), or the session is closed with 1008.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::{BuildError, MessageHook, Plugin, SessionCtx, Verdict};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// Each session has its own buckets.
    #[default]
    Session,
    /// Sessions from one client address share buckets.
    Ip,
    /// Sessions of one JWT subject (`sub`) share buckets; without claims,
    /// the client address.
    Subject,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    /// Drop the message and reply with a JSON error and `retry_after`.
    #[default]
    Reply,
    /// Close the session with 1008.
    Close,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    #[serde(default)]
    pub messages_per_second: Option<u32>,
    /// Messages allowed at once (default: messages_per_second).
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub bytes_per_second: Option<u32>,
    /// Bytes allowed at once (default: bytes_per_second).
    #[serde(default)]
    pub bytes_burst: Option<u32>,
    #[serde(default)]
    pub per: LimitKey,
    #[serde(default)]
    pub action: LimitAction,
}

/// Buckets shared by the sessions of one key.
type Shared<K> = Arc<DefaultKeyedRateLimiter<K>>;

pub struct RateLimitPlugin {
    messages: Option<Quota>,
    bytes: Option<Quota>,
    per: LimitKey,
    action: LimitAction,
    by_ip: (Option<Shared<IpAddr>>, Option<Shared<IpAddr>>),
    by_subject: (Option<Shared<String>>, Option<Shared<String>>),
    /// Sessions started; every [`PRUNE_EVERY`] the shared buckets forget
    /// keys that are full again (so the maps do not grow without bound).
    sessions: std::sync::atomic::AtomicU64,
}

/// How often (in new sessions) idle keys are pruned from shared buckets.
const PRUNE_EVERY: u64 = 1024;

fn quota(field: &str, rate: Option<u32>, burst: Option<u32>) -> Result<Option<Quota>, BuildError> {
    let Some(rate) = rate else {
        return match burst {
            Some(_) => Err(BuildError::new(
                format!("settings.{field}"),
                "a burst needs its rate",
            )),
            None => Ok(None),
        };
    };
    let rate = NonZeroU32::new(rate)
        .ok_or_else(|| BuildError::new(format!("settings.{field}"), "must be greater than 0"))?;
    let burst = match burst {
        None => rate,
        Some(b) => NonZeroU32::new(b)
            .ok_or_else(|| BuildError::new("settings.burst", "must be greater than 0"))?,
    };
    Ok(Some(Quota::per_second(rate).allow_burst(burst)))
}

impl RateLimitPlugin {
    pub fn build(s: &RateLimitSettings) -> Result<Self, BuildError> {
        let messages = quota("messages_per_second", s.messages_per_second, s.burst)?;
        let bytes = quota("bytes_per_second", s.bytes_per_second, s.bytes_burst)?;
        if messages.is_none() && bytes.is_none() {
            return Err(BuildError::new(
                "settings",
                "needs messages_per_second or bytes_per_second",
            ));
        }
        fn keyed<K: std::hash::Hash + Eq + Clone>(q: Option<Quota>) -> Option<Shared<K>> {
            q.map(|q| Arc::new(RateLimiter::keyed(q)))
        }
        Ok(RateLimitPlugin {
            messages,
            bytes,
            per: s.per,
            action: s.action,
            by_ip: (keyed(messages), keyed(bytes)),
            by_subject: (keyed(messages), keyed(bytes)),
            sessions: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl Plugin for RateLimitPlugin {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn session(&self, ctx: &SessionCtx) -> Box<dyn MessageHook> {
        let n = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % PRUNE_EVERY == PRUNE_EVERY - 1 {
            for l in [&self.by_ip.0, &self.by_ip.1].into_iter().flatten() {
                l.retain_recent();
            }
            for l in [&self.by_subject.0, &self.by_subject.1]
                .into_iter()
                .flatten()
            {
                l.retain_recent();
            }
        }
        let subject = ctx
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        let buckets = match (self.per, subject) {
            (LimitKey::Session, _) => Buckets::Own(
                self.messages.map(RateLimiter::direct),
                self.bytes.map(RateLimiter::direct),
            ),
            (LimitKey::Subject, Some(sub)) => Buckets::Subject(self.by_subject.clone(), sub),
            (LimitKey::Ip | LimitKey::Subject, _) => {
                Buckets::Ip(self.by_ip.clone(), ctx.remote.ip())
            }
        };
        Box::new(Limiter {
            buckets,
            action: self.action,
        })
    }
}

enum Buckets {
    Own(
        Option<DefaultDirectRateLimiter>,
        Option<DefaultDirectRateLimiter>,
    ),
    Ip((Option<Shared<IpAddr>>, Option<Shared<IpAddr>>), IpAddr),
    Subject((Option<Shared<String>>, Option<Shared<String>>), String),
}

struct Limiter {
    buckets: Buckets,
    action: LimitAction,
}

/// Outcome of one bucket: Ok, or the wait before a retry can pass.
fn wait<E>(
    r: Result<Result<(), governor::NotUntil<governor::clock::QuantaInstant>>, E>,
) -> Option<std::time::Duration> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(not_until)) => Some(not_until.wait_time_from(DefaultClock::default().now())),
        // More than the burst at once can never pass.
        Err(_) => Some(std::time::Duration::MAX),
    }
}

impl Limiter {
    fn check(&self, len: usize) -> Option<std::time::Duration> {
        let n = NonZeroU32::new(u32::try_from(len).unwrap_or(u32::MAX).max(1)).expect("at least 1");
        let one = NonZeroU32::MIN;
        match &self.buckets {
            Buckets::Own(m, b) => m
                .as_ref()
                .and_then(|l| wait(l.check_n(one)))
                .or_else(|| b.as_ref().and_then(|l| wait(l.check_n(n)))),
            Buckets::Ip((m, b), ip) => m
                .as_ref()
                .and_then(|l| wait(l.check_key_n(ip, one)))
                .or_else(|| b.as_ref().and_then(|l| wait(l.check_key_n(ip, n)))),
            Buckets::Subject((m, b), sub) => m
                .as_ref()
                .and_then(|l| wait(l.check_key_n(sub, one)))
                .or_else(|| b.as_ref().and_then(|l| wait(l.check_key_n(sub, n)))),
        }
    }
}

impl MessageHook for Limiter {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let Some(wait) = self.check(crate::payload(&msg).len()) else {
            return Verdict::Pass(msg);
        };
        match self.action {
            LimitAction::Close => Verdict::Close {
                code: 1008,
                reason: "rate limit exceeded".into(),
            },
            LimitAction::Reply => {
                let retry_after = if wait == std::time::Duration::MAX {
                    serde_json::Value::Null
                } else {
                    // Whole seconds, rounded up, at least 1.
                    serde_json::Value::from(wait.as_secs_f64().ceil().max(1.0) as u64)
                };
                let body =
                    serde_json::json!({"error": "rate limit exceeded", "retry_after": retry_after});
                Verdict::Reply(Message::text(body.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SessionCtx {
        SessionCtx {
            session: "s".into(),
            route: "/r".into(),
            remote: "10.0.0.1:5".parse().unwrap(),
            claims: None,
        }
    }

    #[test]
    fn lets_the_burst_through_then_replies_with_retry_after() {
        let p = RateLimitPlugin::build(&RateLimitSettings {
            messages_per_second: Some(10),
            burst: Some(15),
            bytes_per_second: None,
            bytes_burst: None,
            per: LimitKey::Session,
            action: LimitAction::Reply,
        })
        .unwrap();
        let mut h = p.session(&ctx());
        for _ in 0..15 {
            assert!(matches!(h.on_message(Message::text("x")), Verdict::Pass(_)));
        }
        let Verdict::Reply(Message::Text(body)) = h.on_message(Message::text("x")) else {
            panic!("expected a reply")
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "rate limit exceeded");
        assert_eq!(v["retry_after"], 1);
    }

    #[test]
    fn ip_buckets_are_shared_between_sessions() {
        let p = RateLimitPlugin::build(&RateLimitSettings {
            messages_per_second: Some(2),
            burst: None,
            bytes_per_second: None,
            bytes_burst: None,
            per: LimitKey::Ip,
            action: LimitAction::Close,
        })
        .unwrap();
        let (mut a, mut b) = (p.session(&ctx()), p.session(&ctx()));
        assert!(matches!(a.on_message(Message::text("1")), Verdict::Pass(_)));
        assert!(matches!(b.on_message(Message::text("2")), Verdict::Pass(_)));
        assert!(matches!(
            a.on_message(Message::text("3")),
            Verdict::Close { code: 1008, .. }
        ));
    }

    #[test]
    fn byte_limits_count_payload_bytes() {
        let p = RateLimitPlugin::build(&RateLimitSettings {
            messages_per_second: None,
            burst: None,
            bytes_per_second: Some(100),
            bytes_burst: None,
            per: LimitKey::Session,
            action: LimitAction::Close,
        })
        .unwrap();
        let mut h = p.session(&ctx());
        assert!(matches!(
            h.on_message(Message::binary(vec![0u8; 60])),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            h.on_message(Message::binary(vec![0u8; 60])),
            Verdict::Close { .. }
        ));
    }
}
