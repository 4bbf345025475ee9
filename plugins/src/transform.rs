//! `transform`: add, set or remove fields of JSON object messages, with
//! values that may come from the session: `{{claims.sub}}` (any claim),
//! `{{session.id}}`, `{{session.route}}`, `{{session.remote}}`. A value that
//! is a single placeholder keeps the claim's JSON type; placeholders inside
//! longer strings are interpolated. Field names may be dotted paths
//! (`meta.user`). Messages that are not JSON objects pass unchanged.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::{BuildError, MessageHook, Plugin, SessionCtx, Verdict};

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSettings {
    /// Fields set only when absent.
    #[serde(default)]
    pub add: BTreeMap<String, Value>,
    /// Fields set always.
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    /// Fields removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

pub struct TransformPlugin {
    settings: TransformSettings,
}

impl TransformPlugin {
    pub fn build(s: &TransformSettings) -> Result<Self, BuildError> {
        if s.add.is_empty() && s.set.is_empty() && s.remove.is_empty() {
            return Err(BuildError::new(
                "settings",
                "needs at least one of add, set, remove",
            ));
        }
        for (kind, keys) in [
            ("add", s.add.keys().collect::<Vec<_>>()),
            ("set", s.set.keys().collect()),
            ("remove", s.remove.iter().collect()),
        ] {
            if let Some(bad) = keys
                .iter()
                .find(|k| k.is_empty() || k.split('.').any(str::is_empty))
            {
                return Err(BuildError::new(
                    format!("settings.{kind}"),
                    format!("{bad:?} is not a field path"),
                ));
            }
        }
        Ok(TransformPlugin {
            settings: s.clone(),
        })
    }
}

impl Plugin for TransformPlugin {
    fn name(&self) -> &'static str {
        "transform"
    }

    fn session(&self, ctx: &SessionCtx) -> Box<dyn MessageHook> {
        // Placeholders are resolved once per session.
        let resolve = |map: &BTreeMap<String, Value>| -> Vec<(Vec<String>, Value)> {
            map.iter()
                .map(|(k, v)| (k.split('.').map(str::to_owned).collect(), fill(v, ctx)))
                .collect()
        };
        Box::new(Transform {
            add: resolve(&self.settings.add),
            set: resolve(&self.settings.set),
            remove: self
                .settings
                .remove
                .iter()
                .map(|k| k.split('.').map(str::to_owned).collect())
                .collect(),
        })
    }
}

/// `v` with `{{...}}` placeholders replaced from the session.
fn fill(v: &Value, ctx: &SessionCtx) -> Value {
    let Value::String(s) = v else {
        return v.clone();
    };
    let lookup = |name: &str| -> Value {
        match name {
            "session.id" => ctx.session.clone().into(),
            "session.route" => ctx.route.clone().into(),
            "session.remote" => ctx.remote.to_string().into(),
            _ => match name.strip_prefix("claims.") {
                Some(claim) => ctx
                    .claims
                    .as_ref()
                    .and_then(|c| c.get(claim))
                    .cloned()
                    .unwrap_or(Value::Null),
                None => Value::Null,
            },
        }
    };
    let trimmed = s.trim();
    if let Some(name) = trimmed
        .strip_prefix("{{")
        .and_then(|r| r.strip_suffix("}}"))
    {
        if !name.contains("{{") {
            return lookup(name.trim());
        }
    }
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        let value = lookup(rest[start + 2..start + end].trim());
        match value {
            Value::String(v) => out.push_str(&v),
            Value::Null => {}
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Value::String(out)
}

struct Transform {
    add: Vec<(Vec<String>, Value)>,
    set: Vec<(Vec<String>, Value)>,
    remove: Vec<Vec<String>>,
}

/// The object at `path` minus its last segment, creating objects on the way.
fn parent<'a>(
    root: &'a mut Map<String, Value>,
    path: &[String],
) -> Option<&'a mut Map<String, Value>> {
    let mut node = root;
    for key in &path[..path.len() - 1] {
        let next = node
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        node = next.as_object_mut()?;
    }
    Some(node)
}

impl MessageHook for Transform {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let Message::Text(text) = &msg else {
            return Verdict::Pass(msg);
        };
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text.as_str()) else {
            return Verdict::Pass(msg);
        };
        for path in &self.remove {
            let mut node = Some(&mut obj);
            for key in &path[..path.len() - 1] {
                node = node
                    .and_then(|n| n.get_mut(key))
                    .and_then(Value::as_object_mut);
            }
            if let Some(n) = node {
                n.remove(&path[path.len() - 1]);
            }
        }
        for (path, value) in &self.set {
            if let Some(p) = parent(&mut obj, path) {
                p.insert(path[path.len() - 1].clone(), value.clone());
            }
        }
        for (path, value) in &self.add {
            if let Some(p) = parent(&mut obj, path) {
                p.entry(path[path.len() - 1].clone())
                    .or_insert_with(|| value.clone());
            }
        }
        Verdict::Pass(Message::text(Value::Object(obj).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_claims_and_session_data() {
        let settings: TransformSettings = serde_json::from_value(serde_json::json!({
            "set": {"user": "{{claims.sub}}", "meta.route": "{{session.route}}", "who": "user {{claims.sub}}"},
            "add": {"version": 1, "kind": "chat"},
            "remove": ["secret", "meta.internal"],
        }))
        .unwrap();
        let ctx = SessionCtx {
            session: "s-1".into(),
            route: "/ws/chat".into(),
            remote: "127.0.0.1:9".parse().unwrap(),
            claims: Some(serde_json::json!({"sub": "alice"})),
        };
        let mut hook = TransformPlugin::build(&settings).unwrap().session(&ctx);
        let Verdict::Pass(Message::Text(out)) = hook.on_message(Message::text(
            r#"{"text":"hi","kind":"dm","secret":"x","user":"mallory","meta":{"internal":true}}"#,
        )) else {
            panic!()
        };
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"text":"hi","kind":"dm","user":"alice","who":"user alice","version":1,"meta":{"route":"/ws/chat"}})
        );
        assert_eq!(
            hook.on_message(Message::text("not json")),
            Verdict::Pass(Message::text("not json"))
        );
    }
}
