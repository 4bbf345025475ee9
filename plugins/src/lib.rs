//! muxgate's plugins: the stage model, the [`Plugin`] trait and the
//! built-in plugins, each configured per upstream in `upstreams.yaml`.
//!
//! ```text
//!  client ──handshake──▶ [handshake plugins] ──▶ upgrade / HTTP 401, 403, 429 …
//!  client ──message────▶ [pre_request plugins] ──▶ upstream
//!  client ◀─message──── [post_response plugins] ◀── upstream
//! ```
//!
//! A handshake plugin may refuse with an HTTP status ([`Rejection`]). A
//! message plugin returns a [`Verdict`] for each message: pass it on
//! (possibly changed), drop it (the broker counts it), reply to the sender
//! instead, or close the sender with a code. Plugins keep per-session state
//! in the [`MessageHook`] they make for each session. An upstream without
//! plugins pays nothing on the message path: its hook lists are empty.
//!
//! Settings are typed: [`PluginConfig`] is an enum over the built-ins,
//! so a misspelt plugin name, stage or setting is a config error naming the
//! field, and [`Pipeline::build`] checks what serde cannot (regexes, key
//! files) when the config loads.

#![forbid(unsafe_code)]

pub mod values;

mod api_key;
mod json_schema;
mod jwt;
mod jwt_crypto;
mod message_size;
mod rate_limit;
mod regex_filter;
mod transform;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

pub use api_key::ApiKeySettings;
pub use json_schema::JsonSchemaSettings;
pub use jwt::{JwtPlugin, JwtSettings, JwtVerifier};
pub use message_size::MessageSizeSettings;
pub use rate_limit::RateLimitSettings;
pub use regex_filter::RegexFilterSettings;
pub use transform::TransformSettings;

/// Where in a session a plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// On the client's upgrade request, before anything is connected.
    Handshake,
    /// On each client message, before it goes upstream.
    PreRequest,
    /// On each upstream message, before it goes to the client.
    PostResponse,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Handshake => "handshake",
            Stage::PreRequest => "pre_request",
            Stage::PostResponse => "post_response",
        })
    }
}

/// One entry of an upstream's `plugins` list: `name`, `stage` and the
/// `settings` of that plugin (see [`plugin_config`] for how it is read).
#[derive(Debug, Clone, PartialEq)]
pub enum PluginConfig {
    Jwt {
        stage: Stage,
        settings: JwtSettings,
    },
    ApiKey {
        stage: Stage,
        settings: ApiKeySettings,
    },
    RateLimit {
        stage: Stage,
        settings: RateLimitSettings,
    },
    MessageSize {
        stage: Stage,
        settings: MessageSizeSettings,
    },
    RegexFilter {
        stage: Stage,
        settings: RegexFilterSettings,
    },
    JsonSchema {
        stage: Stage,
        settings: JsonSchemaSettings,
    },
    Transform {
        stage: Stage,
        settings: TransformSettings,
    },
}

/// Reading a [`PluginConfig`]. serde's internally tagged enums buffer the
/// whole entry before they know its variant, and an error found in the
/// buffer names no path below the list: a misspelt setting would be
/// reported as `upstreams[0].plugins: unknown field ...`. Here `settings`
/// is read straight from the file once `name` is known, so its errors
/// carry their whole path (`plugins[0].settings.messages_per_secnd`) and
/// so their line; `settings` written before `name` is read as a
/// YAML-neutral value first, and its errors then name the setting in
/// their message.
mod plugin_config {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, Copy, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        Jwt,
        ApiKey,
        RateLimit,
        MessageSize,
        RegexFilter,
        JsonSchema,
        Transform,
    }

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Field {
        Name,
        Stage,
        Settings,
    }

    /// A plugin's settings, once its name is known.
    struct Settings(Name);

    impl Settings {
        fn config<'de, D: Deserializer<'de>>(
            self,
            stage: Stage,
            d: D,
        ) -> Result<PluginConfig, D::Error> {
            Ok(match self.0 {
                Name::Jwt => PluginConfig::Jwt {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::ApiKey => PluginConfig::ApiKey {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::RateLimit => PluginConfig::RateLimit {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::MessageSize => PluginConfig::MessageSize {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::RegexFilter => PluginConfig::RegexFilter {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::JsonSchema => PluginConfig::JsonSchema {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
                Name::Transform => PluginConfig::Transform {
                    stage,
                    settings: Deserialize::deserialize(d)?,
                },
            })
        }
    }

    /// `settings` read with the stage put in afterwards.
    struct SettingsSeed(Name);

    impl<'de> DeserializeSeed<'de> for SettingsSeed {
        type Value = PluginConfig;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<PluginConfig, D::Error> {
            // The stage is set once the whole entry is read.
            Settings(self.0).config(Stage::Handshake, d)
        }
    }

    impl<'de> Deserialize<'de> for PluginConfig {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PluginConfig, D::Error> {
            d.deserialize_map(EntryVisitor)
        }
    }

    struct EntryVisitor;

    impl<'de> Visitor<'de> for EntryVisitor {
        type Value = PluginConfig;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a plugin: a map of name, stage and settings")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PluginConfig, A::Error> {
            let mut name: Option<Name> = None;
            let mut stage: Option<Stage> = None;
            let mut read: Option<PluginConfig> = None;
            let mut early: Option<serde_json::Value> = None;
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::Name if name.is_some() => {
                        return Err(de::Error::duplicate_field("name"))
                    }
                    Field::Stage if stage.is_some() => {
                        return Err(de::Error::duplicate_field("stage"))
                    }
                    Field::Settings if read.is_some() || early.is_some() => {
                        return Err(de::Error::duplicate_field("settings"))
                    }
                    Field::Name => name = Some(map.next_value()?),
                    Field::Stage => stage = Some(map.next_value()?),
                    Field::Settings => match name {
                        Some(n) => read = Some(map.next_value_seed(SettingsSeed(n))?),
                        None => early = Some(map.next_value()?),
                    },
                }
            }
            let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
            let stage = stage.ok_or_else(|| de::Error::missing_field("stage"))?;
            let mut config = match (read, early) {
                (Some(config), _) => config,
                (None, Some(value)) => Settings(name)
                    .config(stage, value)
                    .map_err(|e| de::Error::custom(format_args!("settings: {e}")))?,
                (None, None) => return Err(de::Error::missing_field("settings")),
            };
            config.set_stage(stage);
            Ok(config)
        }
    }
}

impl PluginConfig {
    fn set_stage(&mut self, to: Stage) {
        match self {
            PluginConfig::Jwt { stage, .. }
            | PluginConfig::ApiKey { stage, .. }
            | PluginConfig::RateLimit { stage, .. }
            | PluginConfig::MessageSize { stage, .. }
            | PluginConfig::RegexFilter { stage, .. }
            | PluginConfig::JsonSchema { stage, .. }
            | PluginConfig::Transform { stage, .. } => *stage = to,
        }
    }

    pub fn stage(&self) -> Stage {
        match self {
            PluginConfig::Jwt { stage, .. }
            | PluginConfig::ApiKey { stage, .. }
            | PluginConfig::RateLimit { stage, .. }
            | PluginConfig::MessageSize { stage, .. }
            | PluginConfig::RegexFilter { stage, .. }
            | PluginConfig::JsonSchema { stage, .. }
            | PluginConfig::Transform { stage, .. } => *stage,
        }
    }

    /// The stages this plugin can run in.
    fn allowed_stages(&self) -> &'static [Stage] {
        match self {
            PluginConfig::Jwt { .. } | PluginConfig::ApiKey { .. } => &[Stage::Handshake],
            PluginConfig::RateLimit { .. } | PluginConfig::MessageSize { .. } => {
                &[Stage::PreRequest, Stage::PostResponse]
            }
            PluginConfig::RegexFilter { .. } | PluginConfig::Transform { .. } => {
                &[Stage::PreRequest, Stage::PostResponse]
            }
            PluginConfig::JsonSchema { .. } => &[Stage::PreRequest],
        }
    }
}

/// A setting that is wrong in a way serde cannot see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BuildError {
    /// The field path below the plugin entry (`settings.patterns[1]`, `stage`).
    pub field: String,
    pub message: String,
}

impl BuildError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> BuildError {
        BuildError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the handshake stage sees and may add to.
pub struct HandshakeCtx<'a> {
    /// The external route that matched.
    pub route: &'a str,
    pub remote: SocketAddr,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// Verified JWT claims, set by the `jwt` plugin (or `auth_required`).
    pub claims: Option<serde_json::Value>,
}

/// A refused handshake: an HTTP status with a generic message (always
/// shown), a detail (shown with `return_error_details`) and headers.
#[derive(Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub message: &'static str,
    pub detail: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A bounded label for metrics.
    pub reason: &'static str,
}

/// What a session's message hooks know of it.
#[derive(Debug, Clone)]
pub struct SessionCtx {
    pub session: String,
    pub route: String,
    pub remote: SocketAddr,
    pub claims: Option<serde_json::Value>,
}

/// A message plugin's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Send on this message (the same or a changed one).
    Pass(Message),
    /// Drop it; the broker counts it under this reason and logs it.
    Drop(&'static str),
    /// Drop it and send this to the sender instead.
    Reply(Message),
    /// Close the sender with this code and reason.
    Close { code: u16, reason: String },
}

/// A built plugin.
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// Handshake stage: refuse, or let the handshake go on.
    fn on_handshake(&self, _ctx: &mut HandshakeCtx<'_>) -> Result<(), Rejection> {
        Ok(())
    }

    /// Message stages: the per-session hook.
    fn session(&self, _ctx: &SessionCtx) -> Box<dyn MessageHook> {
        Box::new(PassAll)
    }
}

/// A plugin's per-session state for one message stage.
pub trait MessageHook: Send {
    fn on_message(&mut self, msg: Message) -> Verdict;
}

struct PassAll;

impl MessageHook for PassAll {
    fn on_message(&mut self, msg: Message) -> Verdict {
        Verdict::Pass(msg)
    }
}

/// An upstream's plugins, by stage, in configured order.
#[derive(Default, Clone)]
pub struct Pipeline {
    handshake: Vec<Arc<dyn Plugin>>,
    pre_request: Vec<Arc<dyn Plugin>>,
    post_response: Vec<Arc<dyn Plugin>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |v: &[Arc<dyn Plugin>]| v.iter().map(|p| p.name()).collect::<Vec<_>>();
        f.debug_struct("Pipeline")
            .field("handshake", &names(&self.handshake))
            .field("pre_request", &names(&self.pre_request))
            .field("post_response", &names(&self.post_response))
            .finish()
    }
}

impl Pipeline {
    /// Builds every plugin; errors carry the index of the entry at fault.
    pub fn build(configs: &[PluginConfig]) -> Result<Pipeline, Vec<(usize, BuildError)>> {
        let mut pipeline = Pipeline::default();
        let mut errors = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let stage = config.stage();
            if !config.allowed_stages().contains(&stage) {
                errors.push((
                    i,
                    BuildError::new(
                        "stage",
                        format!(
                            "this plugin runs in {}, not {stage}",
                            config
                                .allowed_stages()
                                .iter()
                                .map(Stage::to_string)
                                .collect::<Vec<_>>()
                                .join(" or ")
                        ),
                    ),
                ));
                continue;
            }
            let built: Result<Arc<dyn Plugin>, BuildError> = match config {
                PluginConfig::Jwt { settings, .. } => {
                    jwt::JwtPlugin::build(settings).map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::ApiKey { settings, .. } => {
                    api_key::ApiKeyPlugin::build(settings).map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::RateLimit { settings, .. } => {
                    rate_limit::RateLimitPlugin::build(settings)
                        .map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::MessageSize { settings, .. } => {
                    message_size::MessageSizePlugin::build(settings)
                        .map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::RegexFilter { settings, .. } => {
                    regex_filter::RegexFilterPlugin::build(settings)
                        .map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::JsonSchema { settings, .. } => {
                    json_schema::JsonSchemaPlugin::build(settings)
                        .map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
                PluginConfig::Transform { settings, .. } => {
                    transform::TransformPlugin::build(settings)
                        .map(|p| Arc::new(p) as Arc<dyn Plugin>)
                }
            };
            match built {
                Ok(plugin) => match stage {
                    Stage::Handshake => pipeline.handshake.push(plugin),
                    Stage::PreRequest => pipeline.pre_request.push(plugin),
                    Stage::PostResponse => pipeline.post_response.push(plugin),
                },
                Err(e) => errors.push((i, e)),
            }
        }
        if errors.is_empty() {
            Ok(pipeline)
        } else {
            Err(errors)
        }
    }

    /// Puts a plugin first in the handshake stage (the route's
    /// `auth_required` JWT check).
    pub fn require_first(&mut self, plugin: Arc<dyn Plugin>) {
        self.handshake.insert(0, plugin);
    }

    pub fn is_empty(&self) -> bool {
        self.handshake.is_empty() && self.pre_request.is_empty() && self.post_response.is_empty()
    }

    /// Some plugin needs whole messages (`pre_request` or `post_response`),
    /// so the broker must decode every session's messages.
    pub fn reads_messages(&self) -> bool {
        !self.pre_request.is_empty() || !self.post_response.is_empty()
    }

    /// Runs the handshake stage in order; the first refusal wins.
    pub fn on_handshake(&self, ctx: &mut HandshakeCtx<'_>) -> Result<(), Rejection> {
        self.handshake.iter().try_for_each(|p| p.on_handshake(ctx))
    }

    /// The message hooks of one session.
    pub fn session(&self, ctx: &SessionCtx) -> SessionHooks {
        SessionHooks {
            pre_request: self.pre_request.iter().map(|p| p.session(ctx)).collect(),
            post_response: self.post_response.iter().map(|p| p.session(ctx)).collect(),
        }
    }
}

/// One session's message hooks, run in configured order.
#[derive(Default)]
pub struct SessionHooks {
    pre_request: Vec<Box<dyn MessageHook>>,
    post_response: Vec<Box<dyn MessageHook>>,
}

impl SessionHooks {
    pub fn has_pre_request(&self) -> bool {
        !self.pre_request.is_empty()
    }

    pub fn has_post_response(&self) -> bool {
        !self.post_response.is_empty()
    }

    /// A client message through the `pre_request` chain.
    pub fn pre_request(&mut self, msg: Message) -> Verdict {
        run(&mut self.pre_request, msg)
    }

    /// An upstream message through the `post_response` chain.
    pub fn post_response(&mut self, msg: Message) -> Verdict {
        run(&mut self.post_response, msg)
    }
}

fn run(hooks: &mut [Box<dyn MessageHook>], msg: Message) -> Verdict {
    let mut msg = msg;
    for hook in hooks {
        match hook.on_message(msg) {
            Verdict::Pass(next) => msg = next,
            other => return other,
        }
    }
    Verdict::Pass(msg)
}

/// The bytes of a data message (empty for control messages).
pub(crate) fn payload(msg: &Message) -> &[u8] {
    match msg {
        Message::Text(t) => t.as_bytes(),
        Message::Binary(b) => b,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Result<PluginConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn an_entry_reads_in_any_order() {
        for json in [
            r#"{"name": "rate_limit", "stage": "pre_request", "settings": {"messages_per_second": 5}}"#,
            r#"{"settings": {"messages_per_second": 5}, "stage": "pre_request", "name": "rate_limit"}"#,
            r#"{"stage": "pre_request", "settings": {"messages_per_second": 5}, "name": "rate_limit"}"#,
        ] {
            match entry(json) {
                Ok(PluginConfig::RateLimit { stage, settings }) => {
                    assert_eq!(stage, Stage::PreRequest, "{json}");
                    assert_eq!(settings.messages_per_second, Some(5), "{json}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_bad_entry_says_what_is_wrong() {
        let typo = entry(
            r#"{"settings": {"messages_per_secnd": 5}, "name": "rate_limit", "stage": "pre_request"}"#,
        );
        assert!(typo
            .unwrap_err()
            .starts_with("settings: unknown field `messages_per_secnd`"));
        let unknown =
            entry(r#"{"name": "rate_limit", "stage": "pre_request", "settings": {}, "when": 1}"#);
        assert!(unknown.unwrap_err().starts_with("unknown field `when`"));
        let twice = entry(
            r#"{"name": "rate_limit", "name": "jwt", "stage": "pre_request", "settings": {}}"#,
        );
        assert!(twice.unwrap_err().starts_with("duplicate field `name`"));
        let missing = entry(r#"{"name": "rate_limit", "settings": {}}"#);
        assert!(missing.unwrap_err().starts_with("missing field `stage`"));
        let no_settings = entry(r#"{"name": "rate_limit", "stage": "pre_request"}"#);
        assert!(no_settings
            .unwrap_err()
            .starts_with("missing field `settings`"));
    }
}
