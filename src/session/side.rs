//! The two words every session speaks of: its two ends ([`Side`]) and
//! the two ways a message travels between them ([`Direction`]). Both
//! modes' loops are written in them, and metrics label by them (through
//! [`Label`], which metrics define).

use crate::metrics::Label;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

impl Direction {
    /// The way messages read from `side` travel.
    pub(crate) fn read_from(side: Side) -> Direction {
        match side {
            Side::Client => Direction::ClientToUpstream,
            Side::Upstream => Direction::UpstreamToClient,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// One end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

impl Label for Direction {
    fn label(self) -> &'static str {
        self.as_str()
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Label for Side {
    fn label(self) -> &'static str {
        self.as_str()
    }

    fn index(self) -> usize {
        self as usize
    }
}
