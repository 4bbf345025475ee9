//! Field paths (`upstreams[1].websocket_config.pong_wait`), which every
//! config error names, and where such a path stands in the file's text.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

/// A field path such as `upstreams[1].websocket_config.pong_wait`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldPath(pub(super) Vec<Segment>);

impl FieldPath {
    pub(super) fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Key(k.to_string()));
        p
    }
    pub(super) fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where `path` stands in the YAML `text`, as 1-based (line, column).
///
/// Deserialises the document once more with a seed that skips everything
/// off the path and fails on arrival; serde_yaml stamps that failure with the
/// position of the node it was reading. A path that is absent from the text
/// (a defaulted field) falls back to its nearest present parent.
pub(super) fn locate(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    const HERE: &str = "muxgate-locate-here";
    let mut segments = path.0.as_slice();
    loop {
        let de = serde_yaml::Deserializer::from_str(text);
        match (Probe { path: segments }).deserialize(de) {
            Err(e) if e.to_string().contains(HERE) => {
                return e.location().map(|l| (l.line(), l.column()));
            }
            _ if segments.is_empty() => return None,
            _ => segments = &segments[..segments.len() - 1],
        }
    }

    struct Probe<'a> {
        path: &'a [Segment],
    }

    impl<'de> DeserializeSeed<'de> for Probe<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            match self.path.first() {
                None => d.deserialize_any(Arrive),
                Some(Segment::Key(_)) => d.deserialize_map(self),
                Some(Segment::Index(_)) => d.deserialize_seq(self),
            }
        }
    }

    impl<'de> Visitor<'de> for Probe<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Some(Segment::Key(want)) = self.path.first() else {
                return Ok(());
            };
            while let Some(key) = map.next_key::<String>()? {
                if key == *want {
                    return map.next_value_seed(Probe {
                        path: &self.path[1..],
                    });
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Some(Segment::Index(want)) = self.path.first() else {
                return Ok(());
            };
            for _ in 0..*want {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
            }
            seq.next_element_seed(Probe {
                path: &self.path[1..],
            })
            .map(|_| ())
        }
    }

    struct Arrive;
    impl<'de> Visitor<'de> for Arrive {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML")
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(HERE))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(HERE))
        }
    }
}
