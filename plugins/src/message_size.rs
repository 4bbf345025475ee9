//! `message_size`: a per-route limit below `max_message_size`. A larger
//! message closes the session with 1009.

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::values::Size;
use crate::{BuildError, MessageHook, Plugin, SessionCtx, Verdict};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSizeSettings {
    /// The largest message this route accepts, in bytes or with a unit.
    pub max_bytes: Size,
}

pub struct MessageSizePlugin {
    max: usize,
}

impl MessageSizePlugin {
    pub fn build(settings: &MessageSizeSettings) -> Result<Self, BuildError> {
        if settings.max_bytes.0 == 0 {
            return Err(BuildError::new(
                "settings.max_bytes",
                "must be greater than 0",
            ));
        }
        Ok(MessageSizePlugin {
            max: settings.max_bytes.bytes(),
        })
    }
}

impl Plugin for MessageSizePlugin {
    fn name(&self) -> &'static str {
        "message_size"
    }

    fn session(&self, _ctx: &SessionCtx) -> Box<dyn MessageHook> {
        Box::new(Limit(self.max))
    }
}

struct Limit(usize);

impl MessageHook for Limit {
    fn on_message(&mut self, msg: Message) -> Verdict {
        let len = crate::payload(&msg).len();
        if len > self.0 {
            Verdict::Close {
                code: 1009,
                reason: format!(
                    "message of {len} bytes over this route's limit of {}",
                    self.0
                ),
            }
        } else {
            Verdict::Pass(msg)
        }
    }
}
