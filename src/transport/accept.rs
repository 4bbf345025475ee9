//! Accepting client connections evenly over the event loops.
//!
//! Every loop accepts from its own duplicate of the one listening socket
//! (see [`crate::transport::event_loops`]). Left to the kernel, the loop
//! that wakes first takes the connection, and a loop that has just served
//! one is often the first awake again, so connections opened one after
//! another pile up on one loop. A session stays on the loop that took it,
//! and a multiplexed session prefers the pool connection on its loop, so
//! one core would do most of the work.
//!
//! So the loops take turns: one counter, shared by all, gives every
//! accepted connection to the next loop in line. A loop that accepts a
//! connection whose turn is another loop's hands the socket over through
//! that loop's bounded queue ([`HAND_OFF_QUEUE`]); the other loop registers
//! it with its own reactor and serves it as if it had accepted it. A full
//! or closed queue (a loop that is swamped, or has stopped) keeps the
//! connection where it was accepted: no connection waits for a hand-off or
//! is dropped by one. A hand-off costs the other loop one wake per
//! connection, never one per message.
//!
//! Why not one `SO_REUSEPORT` listener per loop: the kernel then spreads
//! connections by a hash of their addresses, which is even only on
//! average (a few hundred connections can split far from evenly), a
//! connection waiting in a busy loop's queue cannot be taken by an idle
//! one, and closing one loop's listener resets the connections in its
//! queue.
//!
//! # Closing for a handover
//!
//! With `server.reuse_port`, a restart's old process closes its listener
//! while the new one keeps the port ([`HandOver`]): each loop stops taking
//! turns, takes whatever the kernel has already queued on the socket, and
//! only then closes its handle on it, so that the connections a close would
//! reset are the few that complete their TCP handshake between that last
//! `accept` and the `close` (none with `net.ipv4.tcp_migrate_req = 1`, which
//! has the kernel move them to another listener of the port). What it took,
//! and what other loops had handed it, it serves still.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::debug;

/// Connections a loop's hand-off queue holds; past that, the loop that
/// accepted a connection keeps it.
pub(crate) const HAND_OFF_QUEUE: usize = 64;

/// A socket on its way to another loop (deregistered from the loop that
/// accepted it), with its peer's address.
type HandedOff = (std::net::TcpStream, SocketAddr);

/// The turns, and every loop's hand-off queue, shared by all loops.
pub(crate) struct Turns {
    next: AtomicUsize,
    queues: Vec<mpsc::Sender<HandedOff>>,
}

/// What a loop receives from the others.
pub(crate) struct HandOffs(mpsc::Receiver<HandedOff>);

impl Turns {
    /// Turns for `loops` loops (at least one), and each loop's end of its
    /// hand-off queue, by loop index.
    pub(crate) fn new(loops: usize) -> (Arc<Turns>, Vec<HandOffs>) {
        let (queues, receivers) = (0..loops.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(HAND_OFF_QUEUE);
                (tx, HandOffs(rx))
            })
            .unzip();
        let turns = Turns {
            next: AtomicUsize::new(0),
            queues,
        };
        (Arc::new(turns), receivers)
    }

    /// The loop whose turn the next connection is.
    fn take_turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len()
    }
}

/// A client listener that a restart's handover closes while what it has
/// already taken is still served (see the module docs).
pub(crate) trait HandOver: axum::serve::Listener {
    /// Stops taking connections: takes what the kernel has queued on the
    /// socket, then closes this listener's handle on it.
    fn close(&mut self);

    /// After [`HandOver::close`]: each connection it had taken, then
    /// `None`.
    fn rest(&mut self) -> impl Future<Output = Option<(Self::Io, Self::Addr)>> + Send;
}

/// One loop's client listener: its own duplicate of the listening socket,
/// and the connections other loops hand it.
pub(crate) struct BalancedListener {
    /// `None` once closed.
    tcp: Option<TcpListener>,
    index: usize,
    turns: Arc<Turns>,
    handed: HandOffs,
    /// What the socket's queue held when it was closed.
    taken: VecDeque<(TcpStream, SocketAddr)>,
}

impl BalancedListener {
    /// The listener of loop `index`, accepting on `tcp` (registered with
    /// this loop's reactor) and receiving on `handed`.
    pub(crate) fn new(
        tcp: TcpListener,
        index: usize,
        turns: Arc<Turns>,
        handed: HandOffs,
    ) -> BalancedListener {
        BalancedListener {
            tcp: Some(tcp),
            index,
            turns,
            handed,
            taken: VecDeque::new(),
        }
    }
}

/// Passes `tcp` to loop `to`; gives it back if that loop's queue is full
/// or gone (closed for a handover, or stopped).
fn hand_off(turns: &Turns, to: usize, tcp: TcpStream, addr: SocketAddr) -> Option<TcpStream> {
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(error) => {
            debug!(%addr, %error, "could not hand a connection to another loop");
            return None;
        }
    };
    match turns.queues[to].try_send((std, addr)) {
        Ok(()) => None,
        Err(TrySendError::Full((std, _)) | TrySendError::Closed((std, _))) => register(std, addr),
    }
}

/// Registers a socket handed over by another loop with this loop's reactor.
fn register(std: std::net::TcpStream, addr: SocketAddr) -> Option<TcpStream> {
    match TcpStream::from_std(std) {
        Ok(tcp) => Some(tcp),
        Err(error) => {
            debug!(%addr, %error, "could not take over a connection from another loop");
            None
        }
    }
}

impl axum::serve::Listener for BalancedListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let Some(tcp) = self.tcp.as_mut() else {
            // Closed: what it had taken, then nothing more.
            return match self.rest().await {
                Some(accepted) => accepted,
                None => std::future::pending().await,
            };
        };
        loop {
            tokio::select! {
                // Both are cancel-safe: a connection is taken by one branch
                // or stays where it was.
                Some((std, addr)) = self.handed.0.recv() => {
                    if let Some(tcp) = register(std, addr) {
                        return (tcp, addr);
                    }
                }
                // axum's accept logs and backs off on errors such as
                // running out of file descriptors.
                (stream, addr) = axum::serve::Listener::accept(tcp) => {
                    let turn = self.turns.take_turn();
                    if turn == self.index {
                        return (stream, addr);
                    }
                    let turns = &self.turns;
                    if let Some(stream) = hand_off(turns, turn, stream, addr) {
                        return (stream, addr);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.tcp {
            Some(tcp) => tcp.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the client listener is closed",
            )),
        }
    }
}

impl HandOver for BalancedListener {
    fn close(&mut self) {
        // No loop hands this one a connection from now on (they keep
        // theirs); those already in the queue stay there for `rest`.
        self.handed.0.close();
        let Some(tcp) = self.tcp.take() else {
            return;
        };
        // Out of the reactor, still non-blocking: `accept` says
        // `WouldBlock` once the queue is empty.
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(error) => {
                debug!(%error, "could not take the client listener out of its event loop; its queue is dropped");
                return;
            }
        };
        loop {
            match std.accept() {
                Ok((stream, addr)) => {
                    let registered = stream
                        .set_nonblocking(true)
                        .map_err(
                            |error| debug!(%addr, %error, "could not take a queued connection"),
                        )
                        .ok()
                        .and_then(|()| register(stream, addr));
                    if let Some(stream) = registered {
                        self.taken.push_back((stream, addr));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    // Out of file descriptors, say: the rest of the queue
                    // is reset with the socket.
                    debug!(%error, "stopped taking queued connections");
                    break;
                }
            }
        }
        // `std` is dropped here: this loop's handle on the socket closes.
    }

    async fn rest(&mut self) -> Option<(TcpStream, SocketAddr)> {
        if let Some(taken) = self.taken.pop_front() {
            return Some(taken);
        }
        // The queue is closed: this ends once it is empty.
        while let Some((std, addr)) = self.handed.0.recv().await {
            if let Some(stream) = register(std, addr) {
                return Some((stream, addr));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    /// Two listeners on one socket, as two loops have them (here on one
    /// runtime: only the turns are under test).
    async fn two_loops() -> (BalancedListener, BalancedListener, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let second = crate::transport::event_loops::duplicate(&tcp).unwrap();
        let second = TcpListener::from_std(second).unwrap();
        let (turns, mut handed) = Turns::new(2);
        let one = handed.pop().unwrap();
        let zero = handed.pop().unwrap();
        (
            BalancedListener::new(tcp, 0, Arc::clone(&turns), zero),
            BalancedListener::new(second, 1, turns, one),
            addr,
        )
    }

    #[tokio::test]
    async fn connections_accepted_by_one_loop_are_shared_in_turn() {
        let (mut zero, mut one, addr) = two_loops().await;
        // Only loop 0 accepts from the socket; every other connection is
        // loop 1's turn and reaches it through its queue, whole.
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut served = [0, 0];
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (tcp, remote) = zero.accept().await;
            assert_eq!(tcp.peer_addr().unwrap(), remote);
            peers.push(remote);
            served[0] += 1;
        }
        while served[1] < 3 {
            let (tcp, remote) = one.accept().await;
            assert_eq!(tcp.peer_addr().unwrap(), remote);
            peers.push(remote);
            served[1] += 1;
        }
        peers.sort();
        let mut local: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        local.sort();
        assert_eq!(peers, local, "each connection is served once");
    }

    /// A handover's close takes what the socket's queue holds and what
    /// other loops had handed the loop; a loop closed hands nothing more;
    /// once every loop has closed, connecting is refused.
    #[tokio::test]
    async fn a_closed_listener_serves_what_it_had_taken_then_the_port_is_free() {
        let (mut zero, mut one, addr) = two_loops().await;
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        // Loop 1 takes both: `a` was loop 0's turn and waits in its queue.
        let (_, remote) = one.accept().await;
        assert_eq!(remote, b.local_addr().unwrap());
        let c = TcpStream::connect(addr).await.unwrap();

        zero.close();
        let (_, first) = zero.rest().await.expect("the queued connection");
        assert_eq!(first, c.local_addr().unwrap(), "taken from the socket");
        let (_, second) = zero.rest().await.expect("the handed connection");
        assert_eq!(second, a.local_addr().unwrap());
        assert!(zero.rest().await.is_none());

        // Loop 1 still listens; loop 0's turn stays with it.
        let d = TcpStream::connect(addr).await.unwrap();
        let (_, remote) = one.accept().await;
        assert_eq!(remote, d.local_addr().unwrap());
        one.close();
        assert!(one.rest().await.is_none());
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn a_loop_whose_queue_is_gone_leaves_the_connection_where_it_was() {
        let (mut zero, one, addr) = two_loops().await;
        drop(one);
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        // The second is loop 1's turn; loop 1 has stopped, so loop 0 keeps it.
        zero.accept().await;
        zero.accept().await;
    }
}
