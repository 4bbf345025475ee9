//! `regex_filter`: deny messages that match patterns, or redact the
//! matches (data masking), in either direction. Built-in `presets` cover
//! card numbers and e-mail addresses. Only text messages are inspected.

use regex::RegexSet;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::{BuildError, MessageHook, Plugin, SessionCtx, Verdict};

/// 13 to 19 digits, optionally grouped by spaces or dashes.
const CARD_NUMBER: &str = r"\b(?:\d[ -]?){12,18}\d\b";
const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterAction {
    /// Close the session with 1008 when a message matches.
    #[default]
    Deny,
    /// Replace every match with `replacement` and pass the message on.
    Redact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    CardNumber,
    Email,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexFilterSettings {
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub presets: Vec<Preset>,
    #[serde(default)]
    pub action: FilterAction,
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_replacement() -> String {
    "[REDACTED]".into()
}

pub struct RegexFilterPlugin {
    set: RegexSet,
    each: Vec<regex::Regex>,
    action: FilterAction,
    replacement: std::sync::Arc<str>,
}

impl RegexFilterPlugin {
    pub fn build(settings: &RegexFilterSettings) -> Result<Self, BuildError> {
        let mut patterns = Vec::new();
        for (i, p) in settings.patterns.iter().enumerate() {
            regex::Regex::new(p).map_err(|e| {
                // regex's message draws the pattern over several lines; keep its verdict.
                let text = e.to_string();
                let verdict = text
                    .lines()
                    .last()
                    .unwrap_or(&text)
                    .trim_start_matches("error: ")
                    .to_owned();
                BuildError::new(
                    format!("settings.patterns[{i}]"),
                    format!("invalid regex {p:?}: {verdict}"),
                )
            })?;
            patterns.push(p.clone());
        }
        for preset in &settings.presets {
            patterns.push(match preset {
                Preset::CardNumber => CARD_NUMBER.to_string(),
                Preset::Email => EMAIL.to_string(),
            });
        }
        if patterns.is_empty() {
            return Err(BuildError::new(
                "settings",
                "needs at least one of `patterns` or `presets`",
            ));
        }
        let set = RegexSet::new(&patterns)
            .map_err(|e| BuildError::new("settings.patterns", e.to_string()))?;
        let each = patterns
            .iter()
            .map(|p| regex::Regex::new(p).expect("checked above"))
            .collect();
        Ok(RegexFilterPlugin {
            set,
            each,
            action: settings.action,
            replacement: settings.replacement.as_str().into(),
        })
    }
}

impl Plugin for RegexFilterPlugin {
    fn name(&self) -> &'static str {
        "regex_filter"
    }

    fn session(&self, _ctx: &SessionCtx) -> Box<dyn MessageHook> {
        Box::new(Filter {
            set: self.set.clone(),
            each: self.each.clone(),
            action: self.action,
            replacement: self.replacement.clone(),
        })
    }
}

struct Filter {
    set: RegexSet,
    each: Vec<regex::Regex>,
    action: FilterAction,
    replacement: std::sync::Arc<str>,
}

impl MessageHook for Filter {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let Message::Text(text) = &msg else {
            return Verdict::Pass(msg);
        };
        if !self.set.is_match(text.as_str()) {
            return Verdict::Pass(msg);
        }
        match self.action {
            FilterAction::Deny => Verdict::Close {
                code: 1008,
                reason: "message denied by policy".into(),
            },
            FilterAction::Redact => {
                let mut out = text.as_str().to_owned();
                for i in self.set.matches(text.as_str()).iter() {
                    out = self.each[i]
                        .replace_all(&out, &*self.replacement)
                        .into_owned();
                }
                Verdict::Pass(Message::text(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(settings: RegexFilterSettings) -> Box<dyn MessageHook> {
        let ctx = SessionCtx {
            session: "s".into(),
            route: "/r".into(),
            remote: "127.0.0.1:1".parse().unwrap(),
            claims: None,
        };
        RegexFilterPlugin::build(&settings).unwrap().session(&ctx)
    }

    #[test]
    fn redacts_card_numbers_and_emails() {
        let mut h = hook(RegexFilterSettings {
            patterns: vec![],
            presets: vec![Preset::CardNumber, Preset::Email],
            action: FilterAction::Redact,
            replacement: "***".into(),
        });
        assert_eq!(
            h.on_message(Message::text(
                "card 4111 1111 1111 1111, mail a.b@example.com, order 42"
            )),
            Verdict::Pass(Message::text("card ***, mail ***, order 42"))
        );
        assert_eq!(
            h.on_message(Message::text("clean")),
            Verdict::Pass(Message::text("clean"))
        );
    }

    #[test]
    fn denies_matches_and_rejects_bad_patterns() {
        let mut h = hook(RegexFilterSettings {
            patterns: vec!["(?i)drop table".into()],
            presets: vec![],
            action: FilterAction::Deny,
            replacement: default_replacement(),
        });
        assert!(matches!(
            h.on_message(Message::text("; DROP TABLE users")),
            Verdict::Close { code: 1008, .. }
        ));
        let err = RegexFilterPlugin::build(&RegexFilterSettings {
            patterns: vec!["ok".into(), "(".into()],
            presets: vec![],
            action: FilterAction::Deny,
            replacement: default_replacement(),
        })
        .err()
        .unwrap();
        assert_eq!(err.field, "settings.patterns[1]");
    }
}
