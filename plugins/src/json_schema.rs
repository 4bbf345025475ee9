//! `json_schema`: client messages must be JSON valid against a JSON Schema
//! file. An invalid message (or one that is not JSON) is dropped and the
//! client told why (`reply`, the default), or the session is closed with
//! 1008 (`close`).
//!
//! Schemas are compiled by `boon` (drafts 4 to 2020-12, `$ref` to files
//! beside the schema). It replaced `jsonschema`, whose build alone took
//! about 100 s of a release build on two cores (BENCHMARKS.md, Build
//! profiles).

use std::sync::Arc;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::{BuildError, MessageHook, Plugin, SessionCtx, Verdict};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaAction {
    /// Drop the message and reply `{"error": "invalid message", "detail": ...}`.
    #[default]
    Reply,
    /// Close the session with 1008.
    Close,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaSettings {
    pub schema_file: String,
    #[serde(default)]
    pub action: SchemaAction,
}

/// A compiled schema: `boon` keeps every schema it compiled (the root and
/// what it refers to) in one `Schemas`, and names the root by its index.
struct CompiledSchema {
    schemas: boon::Schemas,
    root: boon::SchemaIndex,
}

impl CompiledSchema {
    /// `Err` holds what the client is told: each failed keyword with the
    /// place in the message, without the schema's path on the broker.
    fn check(&self, value: &serde_json::Value) -> Result<(), String> {
        let Err(e) = self.schemas.validate(value, self.root) else {
            return Ok(());
        };
        let mut problems = Vec::new();
        leaf_errors(&e, &mut problems);
        Err(problems.join("; "))
    }
}

fn leaf_errors(e: &boon::ValidationError, out: &mut Vec<String>) {
    if e.causes.is_empty() {
        out.push(format!("at '{}': {}", e.instance_location, e.kind));
    }
    for cause in &e.causes {
        leaf_errors(cause, out);
    }
}

pub struct JsonSchemaPlugin {
    schema: Arc<CompiledSchema>,
    action: SchemaAction,
}

impl JsonSchemaPlugin {
    pub fn build(s: &JsonSchemaSettings) -> Result<Self, BuildError> {
        let field = "settings.schema_file";
        let text = std::fs::read_to_string(&s.schema_file)
            .map_err(|e| BuildError::new(field, format!("{}: {e}", s.schema_file)))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BuildError::new(field, format!("{}: not JSON: {e}", s.schema_file)))?;
        // The schema's own location, so that a relative `$ref` resolves
        // beside the file, as the config's other paths do.
        let path = std::path::absolute(&s.schema_file)
            .map_err(|e| BuildError::new(field, format!("{}: {e}", s.schema_file)))?;
        let location = path.to_string_lossy().into_owned();
        let invalid = |e: &dyn std::fmt::Display| {
            BuildError::new(field, format!("{}: not a valid schema: {e}", s.schema_file))
        };
        let mut compiler = boon::Compiler::new();
        compiler
            .add_resource(&location, schema)
            .map_err(|e| invalid(&e))?;
        let mut schemas = boon::Schemas::new();
        let root = compiler
            .compile(&location, &mut schemas)
            .map_err(|e| invalid(&e))?;
        Ok(JsonSchemaPlugin {
            schema: Arc::new(CompiledSchema { schemas, root }),
            action: s.action,
        })
    }
}

impl Plugin for JsonSchemaPlugin {
    fn name(&self) -> &'static str {
        "json_schema"
    }

    fn session(&self, _ctx: &SessionCtx) -> Box<dyn MessageHook> {
        Box::new(Check {
            schema: Arc::clone(&self.schema),
            action: self.action,
        })
    }
}

struct Check {
    schema: Arc<CompiledSchema>,
    action: SchemaAction,
}

impl MessageHook for Check {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let problem = match serde_json::from_slice::<serde_json::Value>(crate::payload(&msg)) {
            Err(e) => format!("not JSON: {e}"),
            Ok(value) => match self.schema.check(&value) {
                Ok(()) => return Verdict::Pass(msg),
                Err(problem) => problem,
            },
        };
        match self.action {
            SchemaAction::Close => Verdict::Close {
                code: 1008,
                reason: format!("invalid message: {problem}"),
            },
            SchemaAction::Reply => Verdict::Reply(Message::text(
                serde_json::json!({"error": "invalid message", "detail": problem}).to_string(),
            )),
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
            remote: "127.0.0.1:1".parse().unwrap(),
            claims: None,
        }
    }

    #[test]
    fn validates_against_a_schema_file() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/schemas/chat-message.json"
        );
        let p = JsonSchemaPlugin::build(&JsonSchemaSettings {
            schema_file: file.into(),
            action: SchemaAction::Reply,
        })
        .unwrap();
        let mut h = p.session(&ctx());
        let ok = Message::text(r#"{"text":"hello","room":7}"#);
        assert_eq!(h.on_message(ok.clone()), Verdict::Pass(ok));
        let Verdict::Reply(reply) = h.on_message(Message::text(r#"{"room":"seven"}"#)) else {
            panic!("an invalid message must be answered");
        };
        let reply: serde_json::Value = serde_json::from_slice(crate::payload(&reply)).unwrap();
        let detail = reply["detail"].as_str().unwrap();
        assert!(detail.contains("missing properties 'text'"), "{detail}");
        assert!(detail.contains("at '/room'"), "{detail}");
        assert!(!detail.contains("chat-message.json"), "{detail}");
    }

    /// A `$ref` to another file resolves beside the schema file.
    #[test]
    fn refers_to_a_file_beside_the_schema() {
        let dir = std::env::temp_dir().join(format!("muxgate-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("room.json"),
            r#"{"type": "integer", "minimum": 1}"#,
        )
        .unwrap();
        let root = dir.join("message.json");
        std::fs::write(
            &root,
            r#"{"type": "object", "properties": {"room": {"$ref": "room.json"}}}"#,
        )
        .unwrap();
        let p = JsonSchemaPlugin::build(&JsonSchemaSettings {
            schema_file: root.to_string_lossy().into_owned(),
            action: SchemaAction::Close,
        })
        .unwrap();
        let mut h = p.session(&ctx());
        let ok = Message::text(r#"{"room":7}"#);
        assert_eq!(h.on_message(ok.clone()), Verdict::Pass(ok));
        assert!(matches!(
            h.on_message(Message::text(r#"{"room":0}"#)),
            Verdict::Close { code: 1008, .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_schema_that_is_not_one_is_refused_when_the_config_loads() {
        let dir = std::env::temp_dir().join(format!("muxgate-bad-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.json");
        std::fs::write(&file, r#"{"type": "no-such-type"}"#).unwrap();
        let Err(e) = JsonSchemaPlugin::build(&JsonSchemaSettings {
            schema_file: file.to_string_lossy().into_owned(),
            action: SchemaAction::Reply,
        }) else {
            panic!("an invalid schema must be refused");
        };
        assert!(e.to_string().contains("not a valid schema"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
