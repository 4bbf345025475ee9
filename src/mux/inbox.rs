//! A multiplexed session's inbox: what its mux connection hands it.
//!
//! Two lanes: the upstream's items for the client, bounded by
//! `client_queue` (full means slow consumer: the connection never waits on
//! one session, mux-protocol.md §6), and signals (slow consumer, a close
//! that found the queue full, a lost connection's unsent messages) that
//! must not wait behind a full queue. A connection sends a session at most
//! one signal of each kind before forgetting it, so that lane needs no
//! bound of its own.
//!
//! Why not two tokio channels: a tokio mpsc channel allocates its first
//! block of 32 slots when it is made, so two of them would be most of
//! what an idle multiplexed session costs. Here the queues
//! allocate on first use and give their memory back when drained (past a
//! few slots), so an idle session's inbox holds no queue memory. The lock
//! is held only to push or pop, never across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use muxgate_backend::protocol::Payload;

/// An item in a session's queue toward its client, in upstream order.
#[derive(Debug)]
pub(crate) enum ToClient {
    Message(Payload),
    /// The upstream closed the session (code already made valid for clients).
    Close {
        code: u16,
        reason: String,
    },
}

/// Out-of-band news for a session.
#[derive(Debug)]
pub(crate) enum Control {
    /// Its queue toward the client was full (mux-protocol §6).
    SlowConsumer,
    /// The upstream closed it while its queue was full.
    Close { code: u16, reason: String },
    /// Its mux connection died; these messages were accepted but never
    /// written, oldest first.
    ConnLost { unsent: Vec<Payload> },
}

/// Slots a drained queue may keep, so steady one-at-a-time traffic does not
/// allocate per message.
const KEEP_SLOTS: usize = 8;

struct Shared {
    state: Mutex<State>,
    /// Wakes the session; it is the only waiter.
    wake: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    items: VecDeque<ToClient>,
    signals: VecDeque<Control>,
    /// The session has gone: senders are told so.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain queues behind,
        // still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The session's end of the inbox.
pub(crate) struct Inbox {
    shared: Arc<Shared>,
}

/// The connection's end of a session's inbox.
#[derive(Clone)]
pub(crate) struct InboxSender {
    shared: Arc<Shared>,
}

/// Why an item was not queued; it comes back.
#[derive(Debug)]
pub(crate) enum SendError<T> {
    /// `client_queue` items wait already.
    Full(T),
    /// The session has ended.
    Closed(T),
}

/// What [`Inbox::recv`] found.
pub(crate) enum Next {
    Signal(Control),
    Item(ToClient),
}

/// A new inbox holding up to `capacity` items (at least one).
pub(crate) fn inbox(capacity: usize) -> (InboxSender, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        InboxSender {
            shared: Arc::clone(&shared),
        },
        Inbox { shared },
    )
}

impl InboxSender {
    /// Queues `item` for the client, unless the queue is full or the
    /// session has ended.
    pub(crate) fn try_send(&self, item: ToClient) -> Result<(), SendError<ToClient>> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(SendError::Closed(item));
        }
        if st.items.len() >= self.shared.capacity {
            return Err(SendError::Full(item));
        }
        st.items.push_back(item);
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Sends a signal past the queue; false when the session has ended.
    pub(crate) fn signal(&self, signal: Control) -> bool {
        let mut st = self.shared.lock();
        if st.closed {
            return false;
        }
        st.signals.push_back(signal);
        drop(st);
        self.shared.wake.notify_one();
        true
    }
}

impl Inbox {
    /// The next signal, or else the next item, waiting for one.
    pub(crate) async fn recv(&self) -> Next {
        loop {
            {
                let mut st = self.shared.lock();
                if let Some(signal) = st.signals.pop_front() {
                    return Next::Signal(signal);
                }
                if let Some(item) = pop_item(&mut st) {
                    return Next::Item(item);
                }
            }
            // A notification sent since the check above is kept for this
            // wait (Notify stores one permit), so none is missed.
            self.shared.wake.notified().await;
        }
    }

    /// The next signal, waiting for one; items stay queued.
    pub(crate) async fn signal(&self) -> Control {
        loop {
            if let Some(signal) = self.shared.lock().signals.pop_front() {
                return signal;
            }
            self.shared.wake.notified().await;
        }
    }

    /// The next item, if one is queued.
    pub(crate) fn try_item(&self) -> Option<ToClient> {
        pop_item(&mut self.shared.lock())
    }

    /// Ends the inbox: senders are refused from now on. Returns how many
    /// items were still queued (they are dropped).
    pub(crate) fn close(&self) -> usize {
        let mut st = self.shared.lock();
        st.closed = true;
        st.signals.clear();
        std::mem::take(&mut st.items).len()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.close();
    }
}

fn pop_item(st: &mut State) -> Option<ToClient> {
    let item = st.items.pop_front();
    if st.items.is_empty() && st.items.capacity() > KEEP_SLOTS {
        st.items = VecDeque::new();
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use muxgate_backend::protocol::Payload;

    fn item(n: u8) -> ToClient {
        ToClient::Message(Payload::Binary(vec![n].into()))
    }

    fn byte(t: ToClient) -> u8 {
        match t {
            ToClient::Message(Payload::Binary(b)) => b[0],
            _ => panic!("not a binary message"),
        }
    }

    #[tokio::test]
    async fn items_keep_their_order_and_a_full_queue_refuses() {
        let (tx, rx) = inbox(3);
        for n in 0..3 {
            tx.try_send(item(n)).unwrap();
        }
        assert!(matches!(tx.try_send(item(9)), Err(SendError::Full(_))));
        for n in 0..3 {
            match rx.recv().await {
                Next::Item(t) => assert_eq!(byte(t), n),
                Next::Signal(_) => panic!("no signal was sent"),
            }
        }
        assert!(rx.try_item().is_none());
    }

    #[tokio::test]
    async fn signals_overtake_items_and_wake_a_waiting_session() {
        let (tx, rx) = inbox(1);
        tx.try_send(item(1)).unwrap();
        assert!(tx.signal(Control::SlowConsumer));
        assert!(matches!(
            rx.recv().await,
            Next::Signal(Control::SlowConsumer)
        ));
        assert!(matches!(rx.recv().await, Next::Item(_)));
        let waiter =
            tokio::spawn(async move { matches!(rx.signal().await, Control::SlowConsumer) });
        tokio::task::yield_now().await;
        tx.try_send(item(2)).unwrap();
        tx.signal(Control::SlowConsumer);
        assert!(waiter.await.unwrap());
        // The session is gone: senders hear so.
        assert!(matches!(tx.try_send(item(3)), Err(SendError::Closed(_))));
        assert!(!tx.signal(Control::SlowConsumer));
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (tx, rx) = inbox(1000);
        for n in 0..100 {
            tx.try_send(item(n)).unwrap();
        }
        while rx.try_item().is_some() {}
        assert_eq!(rx.shared.lock().items.capacity(), 0);
        tx.try_send(item(1)).unwrap();
        assert_eq!(rx.close(), 1);
    }
}
