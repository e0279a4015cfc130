//! Data-plane connections from a client to storage nodes: one QUIC connection and one
//! long-lived bi-stream per node, requests pipelined on it with request ids.

use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use warren_common::config::TlsPaths;
use warren_common::slots::KeyedSlots;
use warren_common::tls::CLUSTER_SERVER_NAME;
use warren_proto::internal::data::{self, ErrorCode, Request, Response};

use crate::StorageError;

/// How long connecting to a storage node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a one-off request may take; pipelined appends rely on the QUIC idle timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an answer goes.
pub enum ReplyTo {
    /// A single waiting caller.
    Once(oneshot::Sender<Result<Response, StorageError>>),
    /// A driver's reply queue, with the driver's tag for the request.
    Queue(
        mpsc::UnboundedSender<(u64, Result<Response, StorageError>)>,
        u64,
    ),
}

impl ReplyTo {
    fn send(self, r: Result<Response, StorageError>) {
        match self {
            ReplyTo::Once(tx) => {
                let _ = tx.send(r);
            }
            ReplyTo::Queue(tx, tag) => {
                let _ = tx.send((tag, r));
            }
        }
    }
}

struct Pending {
    closed: bool,
    waiting: HashMap<u64, ReplyTo>,
}

/// The compute process a client speaks for, said in a `Hello` on every connection so that
/// storage nodes can refuse writes from an evicted generation.
#[derive(Default)]
pub struct Speaker {
    who: Mutex<Option<(warren_common::NodeId, u64)>>,
    // Raised by every change; 0 while there is no identity to say.
    version: AtomicU64,
}

impl Speaker {
    fn set(&self, node: warren_common::NodeId, generation: u64) {
        *self.who.lock().unwrap_or_else(|e| e.into_inner()) = Some((node, generation));
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

/// One open connection to a storage node.
pub struct Conn {
    /// The node identity that answered on this connection, once asked.
    pub identity: std::sync::OnceLock<warren_common::NodeId>,
    // Unbounded because every sender bounds its own requests in flight (a writer's
    // pending window, one request per recovery step); the stream applies backpressure.
    tx: mpsc::UnboundedSender<(Request, ReplyTo)>,
    pending: Arc<Mutex<Pending>>,
    speaker: Arc<Speaker>,
    // The speaker version this connection last said Hello with.
    said: Mutex<u64>,
}

fn close(pending: &Mutex<Pending>, why: &str) {
    let waiting = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        p.closed = true;
        std::mem::take(&mut p.waiting)
    };
    for (_, r) in waiting {
        r.send(Err(StorageError::Unavailable(why.to_string())));
    }
}

impl Conn {
    /// Whether the connection has failed (a new one must be made).
    pub fn is_closed(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed
            || self.tx.is_closed()
    }

    /// Send a request; the answer (or the connection's failure) goes to `reply`.
    pub fn submit(&self, req: Request, reply: ReplyTo) {
        let version = self.speaker.version.load(Ordering::Acquire);
        if version != 0 {
            let mut said = self.said.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock, so the Hello goes out before any request that checked after
            // the identity changed.
            if *said != version {
                let who = *self.speaker.who.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((node, generation)) = who {
                    let (tx, _) = oneshot::channel();
                    let hello = Request::Hello {
                        node: node.0.into_bytes(),
                        generation,
                    };
                    let _ = self.tx.send((hello, ReplyTo::Once(tx)));
                }
                *said = version;
            }
        }
        if let Err(e) = self.tx.send((req, reply)) {
            (e.0).1.send(Err(StorageError::Unavailable(
                "storage connection closed".into(),
            )));
        }
    }

    /// Send a request and wait for its answer.
    pub async fn request(&self, req: Request) -> Result<Response, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.submit(req, ReplyTo::Once(tx));
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StorageError::Unavailable(
                "storage connection closed".into(),
            )),
            Err(_) => Err(StorageError::Unavailable(
                "storage request timed out".into(),
            )),
        }
    }

    async fn open(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        speaker: Arc<Speaker>,
    ) -> Result<Conn, StorageError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            StorageError::Unavailable(format!("storage node {addr}: {e}"))
        };
        let connecting = endpoint
            .connect(addr, CLUSTER_SERVER_NAME)
            .map_err(|e| unavailable(&e))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|e| unavailable(&e))?
            .map_err(|e| unavailable(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unavailable(&e))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<(Request, ReplyTo)>();
        let pending = Arc::new(Mutex::new(Pending {
            closed: false,
            waiting: HashMap::new(),
        }));
        let next_id = AtomicU64::new(1);

        let writer_pending = pending.clone();
        let writer_conn = conn.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            while let Some((req, reply)) = rx.recv().await {
                let mut batch = vec![(req, reply)];
                while batch.len() < 1024 {
                    let Ok(more) = rx.try_recv() else { break };
                    batch.push(more);
                }
                {
                    let mut p = writer_pending.lock().unwrap_or_else(|e| e.into_inner());
                    for (req, reply) in batch {
                        if p.closed {
                            reply.send(Err(StorageError::Unavailable(
                                "storage connection closed".into(),
                            )));
                            continue;
                        }
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        data::encode_request(id, &req, &mut buf);
                        p.waiting.insert(id, reply);
                    }
                }
                if buf.is_empty() {
                    continue;
                }
                if let Err(e) = send.write_all(&buf).await {
                    close(&writer_pending, &format!("storage node {addr}: {e}"));
                    writer_conn.close(quinn::VarInt::from_u32(1), b"write failed");
                    break;
                }
                buf.clear();
            }
            // Everything still queued fails with the connection.
            rx.close();
            while let Ok((_, reply)) = rx.try_recv() {
                reply.send(Err(StorageError::Unavailable(
                    "storage connection closed".into(),
                )));
            }
        });

        let reader_pending = pending.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let why = loop {
                match data::decode_response(&mut buf) {
                    Ok(Some((id, resp))) => {
                        let reply = reader_pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .waiting
                            .remove(&id);
                        if let Some(r) = reply {
                            r.send(match resp {
                                // The writer must stop exactly as if fenced.
                                Response::Error {
                                    code: ErrorCode::Evicted,
                                    message,
                                } => Err(StorageError::Fenced(message)),
                                other => Ok(other),
                            });
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break format!("storage node {addr} sent a bad frame: {e}"),
                }
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
                match recv.read_buf(&mut buf).await {
                    Ok(0) => break format!("storage node {addr} closed the stream"),
                    Ok(_) => {}
                    Err(e) => break format!("storage node {addr}: {e}"),
                }
            };
            tracing::debug!(%why, "storage connection closed");
            close(&reader_pending, &why);
            conn.close(quinn::VarInt::from_u32(1), b"closed");
        });
        Ok(Conn {
            identity: std::sync::OnceLock::new(),
            tx,
            pending,
            speaker,
            said: Mutex::new(0),
        })
    }
}

/// Connections to every storage node this client talks to.
pub struct DataClient {
    endpoint: quinn::Endpoint,
    speaker: Arc<Speaker>,
    conns: KeyedSlots<SocketAddr, Slot>,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    // A failed connect is not retried for FAIL_FAST, so callers that fall back to another
    // replica do not each wait out a connect timeout on a dead node.
    failed_at: Option<std::time::Instant>,
}

const FAIL_FAST: Duration = Duration::from_secs(1);

impl DataClient {
    /// A client endpoint presenting this node's certificate.
    pub fn new(tls: &TlsPaths) -> Result<DataClient, StorageError> {
        Ok(DataClient {
            endpoint: crate::quic::client_endpoint(tls)?,
            speaker: Arc::default(),
            conns: KeyedSlots::default(),
        })
    }

    /// The open connection to `addr`, connecting if there is none or it failed.
    pub async fn conn(&self, addr: SocketAddr) -> Result<Arc<Conn>, StorageError> {
        let slot = self.conns.slot(addr);
        let mut slot = slot.lock().await;
        if let Some(c) = slot.conn.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        if slot.failed_at.is_some_and(|t| t.elapsed() < FAIL_FAST) {
            return Err(StorageError::Unavailable(format!(
                "storage node {addr} recently unreachable"
            )));
        }
        match Conn::open(&self.endpoint, addr, self.speaker.clone()).await {
            Ok(c) => {
                let c = Arc::new(c);
                slot.conn = Some(c.clone());
                slot.failed_at = None;
                Ok(c)
            }
            Err(e) => {
                slot.conn = None;
                slot.failed_at = Some(std::time::Instant::now());
                Err(e)
            }
        }
    }

    /// Speak for compute process `node` at `generation` from now on: every connection says
    /// so in a `Hello` before its next request.
    pub fn set_identity(&self, node: warren_common::NodeId, generation: u64) {
        self.speaker.set(node, generation);
    }

    /// One request to `addr`, waiting for the answer.
    pub async fn request(&self, addr: SocketAddr, req: Request) -> Result<Response, StorageError> {
        self.conn(addr).await?.request(req).await
    }
}
