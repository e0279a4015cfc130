//! Direct replies to reply names homed on other compute nodes, sent in publish order: one
//! sender task per home node writes every reply from this node to it on one long-lived
//! reply stream (see `warren_proto::internal::peer`), so two replies to one name arrive in
//! the order they were published.
//!
//! The publisher never waits on the network: it queues the reply for the home's sender,
//! and a reply that finds the queue over its bound is dropped (direct reply-to is
//! at-most-once, in RabbitMQ too). A stream that breaks is dropped with the replies being
//! written on it; the next reply opens a new one. A sender with nothing to send for a while
//! closes its stream and ends, so idle pairs of nodes hold no reply stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tracing::debug;
use warren_proto::internal::peer::{self as wire, PeerRequest, WireMessage};

use super::peer::{CONNECT_TIMEOUT, MAX_BATCH, Peers};

/// Replies queued for one home node at most (beyond it, replies are dropped).
const QUEUED_REPLIES: usize = 4096;
/// Bytes of replies queued for one home node at most; one reply larger than this still
/// goes when nothing else is queued.
const QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// A sender with nothing to send this long closes its stream and ends.
const SENDER_IDLE: Duration = Duration::from_secs(60);

/// One reply on its way.
type Reply = (String, WireMessage);

/// The queue of one home node's sender.
struct Sender {
    tx: mpsc::Sender<Reply>,
    /// Bytes of the replies in `tx`.
    queued: Arc<AtomicUsize>,
}

/// The ordered reply senders of this node, one per home node in use.
#[derive(Default)]
pub(super) struct ReplySenders {
    senders: Mutex<HashMap<SocketAddr, Sender>>,
}

fn lock(
    m: &Mutex<HashMap<SocketAddr, Sender>>,
) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Sender>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn size(r: &Reply) -> usize {
    r.0.len() + r.1.properties.len() + r.1.body.len() + r.1.exchange.len() + r.1.routing_key.len()
}

impl ReplySenders {
    /// Queue a reply for the home node at `addr`, starting its sender if it has none.
    /// Never waits; an error says why the reply was dropped.
    pub(super) fn send(
        &self,
        peers: &Arc<Peers>,
        addr: SocketAddr,
        reply: Reply,
    ) -> Result<(), String> {
        let n = size(&reply);
        let mut senders = lock(&self.senders);
        let sender = senders
            .entry(addr)
            .or_insert_with(|| start(Arc::downgrade(peers), addr));
        if sender.tx.is_closed() {
            // Its task ended without retiring (the node is stopping); a new one starts.
            *sender = start(Arc::downgrade(peers), addr);
        }
        // Counted before it is queued, so the sender never subtracts what was not added.
        let before = sender.queued.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > QUEUED_BYTES {
            sender.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(format!(
                "peer {addr}: {before} bytes of replies already queued"
            ));
        }
        sender.tx.try_send(reply).map_err(|e| {
            sender.queued.fetch_sub(n, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    format!("peer {addr}: {QUEUED_REPLIES} replies already queued")
                }
                mpsc::error::TrySendError::Closed(_) => format!("peer {addr}: sender stopped"),
            }
        })
    }

    /// Forget the sender of `addr` if nothing is queued for it (its task then ends); false
    /// if something is (it goes on). Holding the map's lock while checking means no reply
    /// can be queued for a sender that is going away.
    fn retire(&self, addr: SocketAddr, rx: &mut mpsc::Receiver<Reply>) -> bool {
        let mut senders = lock(&self.senders);
        if !rx.is_empty() {
            return false;
        }
        senders.remove(&addr);
        rx.close();
        true
    }
}

fn start(peers: Weak<Peers>, addr: SocketAddr) -> Sender {
    let (tx, rx) = mpsc::channel(QUEUED_REPLIES);
    let queued = Arc::new(AtomicUsize::new(0));
    tokio::spawn(run(peers, addr, rx, queued.clone()));
    Sender { tx, queued }
}

/// The sender of one home node: writes its replies, in order, on one stream.
async fn run(
    peers: Weak<Peers>,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Reply>,
    queued: Arc<AtomicUsize>,
) {
    let mut stream: Option<(quinn::SendStream, quinn::RecvStream)> = None;
    let mut buf = BytesMut::new();
    loop {
        let first = match tokio::time::timeout(SENDER_IDLE, rx.recv()).await {
            Ok(Some(r)) => r,
            // Every sender handle is gone: the node is stopping.
            Ok(None) => break,
            Err(_) => {
                let Some(p) = peers.upgrade() else { break };
                if p.replies.retire(addr, &mut rx) {
                    break;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.iter().map(size).sum(), Ordering::AcqRel);
        let count = batch.len();
        for (name, msg) in batch {
            wire::encode_request(&PeerRequest::DirectReply { name, msg }, &mut buf);
        }
        let out = buf.split();
        if stream.is_none() {
            let Some(p) = peers.upgrade() else { break };
            let opened = tokio::time::timeout(CONNECT_TIMEOUT * 2, p.open_stream(addr)).await;
            match opened {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => {
                    debug!(%addr, error = %e, count, "direct replies to a peer dropped");
                    continue;
                }
                Err(_) => {
                    debug!(%addr, count, "direct replies to a peer dropped: open timed out");
                    continue;
                }
            }
        }
        if let Some((send, _)) = stream.as_mut()
            && let Err(e) = send.write_all(&out).await
        {
            // Some of them may have arrived: resending could repeat them out of order.
            debug!(%addr, error = %e, count, "reply stream to a peer broke; its replies are dropped");
            stream = None;
        }
    }
    if let Some((mut send, _)) = stream {
        let _ = send.finish();
    }
}
