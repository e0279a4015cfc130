//! The QUIC data-plane server: one task per connection, one reader and one writer task per
//! bi-stream. Requests on a stream are pipelined: each takes a slot in the stream's bounded
//! response queue before it is dispatched, so a client that stops reading answers stops
//! getting requests served instead of growing the node's memory.

use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use warren_proto::internal::data::{self, ErrorCode, Request, Response};

use super::membership::ComputeGate;
use super::store::{Mutation, Store};
use warren_common::NodeId;

/// Most requests in flight on one stream.
const MAX_IN_FLIGHT: usize = 4096;
/// Most entries or bytes one read returns.
const MAX_READ_ENTRIES: u32 = 4096;
const MAX_READ_BYTES: u32 = 16 * 1024 * 1024;

/// Accept connections until the endpoint is closed.
pub async fn serve(
    endpoint: quinn::Endpoint,
    store: Arc<Store>,
    node: NodeId,
    gate: Arc<ComputeGate>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let store = store.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "data-plane handshake failed");
                    return;
                }
            };
            let peer = conn.remote_address();
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        tokio::spawn(serve_stream(send, recv, store.clone(), node, gate.clone()));
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "data-plane connection closed");
                        return;
                    }
                }
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: Arc<Store>,
    node: NodeId,
    gate: Arc<ComputeGate>,
) {
    let (tx, mut rx) = mpsc::channel::<(u64, Response)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        while let Some((id, resp)) = rx.recv().await {
            data::encode_response(id, &resp, &mut buf);
            // Coalesce whatever else is ready into the same write.
            while buf.len() < 1024 * 1024 {
                let Ok((id, resp)) = rx.try_recv() else { break };
                data::encode_response(id, &resp, &mut buf);
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        let _ = send.finish();
    });
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // The compute process this stream speaks for, once it said Hello. Streams without one
    // (tools, tests of storage alone) are not checked against the compute registry.
    let mut hello: Option<(NodeId, u64)> = None;
    'read: loop {
        loop {
            let (id, req) = match data::decode_request(&mut buf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad data-plane frame; closing stream");
                    recv.stop(quinn::VarInt::from_u32(1)).ok();
                    break 'read;
                }
            };
            let Ok(permit) = tx.clone().reserve_owned().await else {
                break 'read;
            };
            if let Request::Hello { node, generation } = req {
                hello = Some((NodeId(uuid::Uuid::from_bytes(node)), generation));
                permit.send((id, Response::Ok));
                continue;
            }
            if let Some((compute, generation)) = hello
                && is_write(&req)
                && gate.refuses(compute, generation)
            {
                tracing::debug!(%compute, generation, "refused a write from an evicted compute generation");
                permit.send((
                    id,
                    Response::Error {
                        code: ErrorCode::Evicted,
                        message: format!(
                            "compute node {compute} generation {generation} was evicted"
                        ),
                    },
                ));
                continue;
            }
            dispatch(id, req, permit, &store, node).await;
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn is_write(req: &Request) -> bool {
    matches!(
        req,
        Request::Append { .. }
            | Request::Fence { .. }
            | Request::Seal { .. }
            | Request::Delete { .. }
    )
}

async fn dispatch(
    id: u64,
    req: Request,
    permit: mpsc::OwnedPermit<(u64, Response)>,
    store: &Arc<Store>,
    node: NodeId,
) {
    let mutation = match req {
        Request::Append {
            segment,
            epoch,
            entry,
            lac,
            payload,
        } => Mutation::Append {
            segment,
            epoch,
            entry,
            lac,
            payload,
        },
        Request::Fence { segment, epoch } => Mutation::Fence { segment, epoch },
        Request::Seal { segment, end } => Mutation::Seal { segment, end },
        Request::Delete { segment } => Mutation::Delete { segment },
        Request::Read {
            segment,
            from,
            max_entries,
            max_bytes,
        } => {
            let store = store.clone();
            tokio::spawn(async move {
                let resp = tokio::task::spawn_blocking(move || {
                    store.read(
                        segment,
                        from,
                        max_entries.min(MAX_READ_ENTRIES),
                        max_bytes.min(MAX_READ_BYTES),
                    )
                })
                .await
                .unwrap_or_else(|e| Response::Error {
                    code: ErrorCode::Unavailable,
                    message: e.to_string(),
                });
                permit.send((id, resp));
            });
            return;
        }
        Request::Hello { .. } => {
            // Handled by the stream, which owns the connection's identity.
            permit.send((id, Response::Ok));
            return;
        }
        Request::Identify => {
            permit.send((
                id,
                Response::Identity {
                    node: node.0.into_bytes(),
                },
            ));
            return;
        }
        Request::Stats => {
            let s = store.stats();
            permit.send((
                id,
                Response::Stats {
                    fsyncs: s.fsyncs.load(Ordering::Relaxed),
                    records: s.records.load(Ordering::Relaxed),
                    bytes: s.bytes.load(Ordering::Relaxed),
                },
            ));
            return;
        }
    };
    store
        .submit(
            mutation,
            Box::new(move |resp| {
                permit.send((id, resp));
            }),
        )
        .await;
}
