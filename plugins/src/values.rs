//! Value types of the config file: strings with `${NAME}` expansion,
//! secrets that never print, sizes and durations.
//!
//! Expansion happens while serde deserialises each string value, not on the
//! raw text, so a `${NAME}` in a comment is left alone and an unset variable
//! is reported by serde_yaml with the field's path, line and column.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Replaces every `${NAME}` in `raw` with the environment variable NAME.
pub fn expand_env(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` in {raw:?}"))?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "`${{{name}}}` is not a valid environment variable name"
            ));
        }
        match std::env::var(name) {
            Ok(value) => out.push_str(&value),
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("environment variable `{name}` is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("environment variable `{name}` is not valid UTF-8"))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expanded_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    expand_env(&raw).map_err(de::Error::custom)
}

/// A string value with `${NAME}` expanded.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expanded_string(d).map(Text)
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string value that is never printed: `Debug` shows `"***"`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expanded_string(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A size in bytes: an integer, or a string such as `64KiB` or `16MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, such as 4096, \"64KiB\" or \"16MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                let v = expand_env(v).map_err(E::custom)?;
                bytesize::ByteSize::from_str(v.trim())
                    .map(|b| Size(b.as_u64()))
                    .map_err(|e| {
                        E::custom(format!(
                            "invalid size {v:?} ({e}); use bytes or a unit such as KiB, MiB"
                        ))
                    })
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// A humantime duration string (`30s`, `250ms`, `2m`).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = expanded_string(d)?;
    parse_duration(&raw).map_err(de::Error::custom)
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| {
        format!("invalid duration {raw:?} ({e}); use a value such as 30s, 250ms or 2m")
    })
}

/// A bare integer number of seconds, or a humantime duration string.
pub fn seconds_or_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct SecondsVisitor;
    impl Visitor<'_> for SecondsVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number of seconds or a duration such as \"60s\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("seconds must not be negative, got {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            let v = expand_env(v).map_err(E::custom)?;
            parse_duration(&v).map_err(E::custom)
        }
    }
    d.deserialize_any(SecondsVisitor)
}

/// A `host:port` socket address given as a string.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = expanded_string(d)?;
    SocketAddr::from_str(raw.trim()).map_err(|e| {
        de::Error::custom(format!(
            "invalid listen address {raw:?} ({e}); use IP:PORT such as 0.0.0.0:8080"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_set_variables_and_rejects_unset_ones() {
        std::env::set_var("MUXGATE_TEST_EXPAND", "s3cret");
        assert_eq!(
            expand_env("a-${MUXGATE_TEST_EXPAND}-b").unwrap(),
            "a-s3cret-b"
        );
        assert_eq!(expand_env("no vars, $5").unwrap(), "no vars, $5");
        assert_eq!(
            expand_env("${MUXGATE_TEST_SURELY_UNSET}").unwrap_err(),
            "environment variable `MUXGATE_TEST_SURELY_UNSET` is not set"
        );
        assert!(expand_env("${OPEN").unwrap_err().contains("unterminated"));
        assert!(expand_env("${1BAD}").unwrap_err().contains("not a valid"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }
}
