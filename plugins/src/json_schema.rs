//! `json_schema`: client messages must be JSON valid against a JSON Schema
//! file. An invalid message (or one that is not JSON) is dropped and the
//! client told why (`reply`, the default), or the session is closed with
//! 1008 (`close`).

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

pub struct JsonSchemaPlugin {
    validator: Arc<jsonschema::Validator>,
    action: SchemaAction,
}

impl JsonSchemaPlugin {
    pub fn build(s: &JsonSchemaSettings) -> Result<Self, BuildError> {
        let field = "settings.schema_file";
        let text = std::fs::read_to_string(&s.schema_file)
            .map_err(|e| BuildError::new(field, format!("{}: {e}", s.schema_file)))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BuildError::new(field, format!("{}: not JSON: {e}", s.schema_file)))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| {
            BuildError::new(field, format!("{}: not a valid schema: {e}", s.schema_file))
        })?;
        Ok(JsonSchemaPlugin {
            validator: Arc::new(validator),
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
            validator: Arc::clone(&self.validator),
            action: self.action,
        })
    }
}

struct Check {
    validator: Arc<jsonschema::Validator>,
    action: SchemaAction,
}

impl MessageHook for Check {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let problem = match serde_json::from_slice::<serde_json::Value>(crate::payload(&msg)) {
            Err(e) => format!("not JSON: {e}"),
            Ok(value) => match self.validator.validate(&value) {
                Ok(()) => return Verdict::Pass(msg),
                Err(e) => e.to_string(),
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
        let ctx = SessionCtx {
            session: "s".into(),
            route: "/r".into(),
            remote: "127.0.0.1:1".parse().unwrap(),
            claims: None,
        };
        let mut h = p.session(&ctx);
        let ok = Message::text(r#"{"text":"hello","room":7}"#);
        assert_eq!(h.on_message(ok.clone()), Verdict::Pass(ok));
        assert!(matches!(
            h.on_message(Message::text(r#"{"room":7}"#)),
            Verdict::Reply(_)
        ));
    }
}
