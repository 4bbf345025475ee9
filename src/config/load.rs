//! Reading a config file: the file, YAML with `${NAME}` expansion, then
//! validation. This is the only module that touches serde_yaml, so the
//! parser can be swapped in one place.
//!
//! Every error names the file, the field path and, where the YAML parser
//! knows it, the line and column. serde_yaml reports those for what it
//! finds itself; for the semantic checks of [`super::validate`], which run on
//! the parsed structs, [`locate`] walks the document again to the offending
//! path and lets serde_yaml tell where it stands.

use std::fmt;
use std::path::Path;

use super::path::{locate, FieldPath, Segment};
use super::validate::validate;
use super::Config;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(file, errors))]
    Invalid {
        file: String,
        errors: Vec<FieldError>,
    },
}

impl ConfigError {
    /// The individual field errors, empty for an unreadable file.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { errors, .. } => errors,
        }
    }
}

fn render(file: &str, errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{file}: {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem in the file: `path: message at line L column C`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `upstreams[1].websocket_config.pong_wait`; empty for the document itself.
    pub path: String,
    pub message: String,
    /// 1-based line and column, where known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() && self.path != "." {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some((line, column)) = self.location {
            write!(f, " at line {line} column {column}")?;
        }
        Ok(())
    }
}

/// Loads and validates the file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let mut config = load_str(&file, &text)?;
    config.source = Some(path.to_path_buf());
    Ok(config)
}

/// Parses and validates `text`; `file` names it in errors.
pub fn load_str(file: &str, text: &str) -> Result<Config, ConfigError> {
    let invalid = |errors| ConfigError::Invalid {
        file: file.to_string(),
        errors,
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let mut config: Config =
        serde_path_to_error::deserialize(de).map_err(|e| invalid(vec![from_yaml(text, &e)]))?;
    config.generation = super::generation_of(text);
    let problems = validate(&config);
    if problems.is_empty() {
        return Ok(config);
    }
    Err(invalid(
        problems
            .into_iter()
            .map(|p| FieldError {
                location: locate(text, &p.path),
                path: p.path.to_string(),
                message: p.message,
            })
            .collect(),
    ))
}

/// Turns a parse error into a [`FieldError`] with the exact field path.
///
/// serde_yaml's own path stops at the map that holds a field whose value
/// failed to deserialise (a bad duration, an unset variable), and so does its
/// position; serde_path_to_error knows the full path, and [`locate`] finds
/// where that field's value stands.
fn from_yaml(text: &str, e: &serde_path_to_error::Error<serde_yaml::Error>) -> FieldError {
    let mut own = split_yaml_error(e.inner());
    let full = FieldPath(
        e.path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
                serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => None,
            })
            .collect(),
    );
    let full_text = full.to_string();
    // For an unknown key serde_yaml already points at the key itself;
    // the full path ends with the key.
    if own.message.starts_with("unknown field") {
        if !full_text.is_empty() {
            own.path = full_text;
        }
        return own;
    }
    if !full_text.is_empty() && full_text != own.path {
        own.location = locate(text, &full).or(own.location);
        own.path = full_text;
    }
    own
}

/// Splits serde_yaml's `path: message at line L column C` into its parts.
fn split_yaml_error(e: &serde_yaml::Error) -> FieldError {
    let mut text = e.to_string();
    let location = e.location().map(|l| (l.line(), l.column()));
    if let Some((line, column)) = location {
        let suffix = format!(" at line {line} column {column}");
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_string();
        }
    }
    // serde_yaml prefixes the path as `a.b[1].c: `; a top-level error has none.
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if !p.contains(' ') && !p.is_empty() => (p.to_string(), m.to_string()),
        _ => (String::new(), text),
    };
    FieldError {
        path,
        message,
        location,
    }
}
