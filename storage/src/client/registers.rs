//! The CASPaxos proposer: every `update` is one prepare round and one accept round against
//! a majority of the seed acceptors, retried with a higher ballot and jittered backoff when
//! another proposer got in between.

use bytes::Bytes;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use warren_common::config::TlsPaths;
use warren_proto::internal::registers::{AcceptRequest, PrepareRequest};

use crate::StorageError;
use crate::protocol::caspaxos::{Ballot, PhaseTally, Tally};
use crate::rpc::{AcceptorClient, ballot_from_wire, ballot_to_wire};

/// Attempts before an update gives up with `Unavailable`.
const MAX_ATTEMPTS: usize = 40;

/// Linearizable single-key registers replicated with CASPaxos on the storage nodes.
#[derive(Clone)]
pub struct Registers {
    inner: Arc<Inner>,
}

struct Inner {
    acceptors: Vec<AcceptorClient>,
    proposer: [u8; 16],
    counter: AtomicU64,
}

impl Registers {
    /// A proposer against the acceptors at `seeds` (connections are made lazily).
    pub fn connect(seeds: &[SocketAddr], tls: &TlsPaths) -> Result<Registers, StorageError> {
        if seeds.is_empty() {
            return Err(StorageError::Invalid("no register seeds configured".into()));
        }
        let acceptors = seeds
            .iter()
            .map(|a| AcceptorClient::new(*a, tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Registers {
            inner: Arc::new(Inner {
                acceptors,
                proposer: *uuid::Uuid::new_v4().as_bytes(),
                counter: AtomicU64::new(0),
            }),
        })
    }

    fn next_ballot(&self) -> Ballot {
        Ballot {
            counter: self.inner.counter.fetch_add(1, Ordering::Relaxed) + 1,
            proposer: self.inner.proposer,
        }
    }

    fn outbid(&self, seen: Option<Ballot>) {
        if let Some(b) = seen {
            self.inner.counter.fetch_max(b.counter, Ordering::Relaxed);
        }
    }

    /// Read a register's current value (a linearizable read: a full CASPaxos round).
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let r = self
            .update(key, |cur| Ok::<_, std::convert::Infallible>(cur.cloned()))
            .await?;
        match r {
            Ok(v) => Ok(v),
            Err(never) => match never {},
        }
    }

    /// [`Registers::get`] giving up after `attempts` rounds.
    pub(crate) async fn get_with_attempts(
        &self,
        key: &str,
        attempts: usize,
    ) -> Result<Option<Bytes>, StorageError> {
        let r = self
            .update_with_attempts(
                key,
                |cur| Ok::<_, std::convert::Infallible>(cur.cloned()),
                attempts,
            )
            .await
            .map_err(|f| f.error)?;
        match r {
            Ok(v) => Ok(v),
            Err(never) => match never {},
        }
    }

    /// Atomically replace a register's value with `change(current)`. `change` may run more
    /// than once (on contention) and must be a pure function of its input. It returns the
    /// new value (`None` deletes), or `Err` to abort without writing; the abort comes back as
    /// `Ok(Err(e))`. On success returns the value written.
    pub async fn update<E, F>(
        &self,
        key: &str,
        change: F,
    ) -> Result<Result<Option<Bytes>, E>, StorageError>
    where
        F: FnMut(Option<&Bytes>) -> Result<Option<Bytes>, E> + Send,
        E: Send,
    {
        self.update_with_attempts(key, change, MAX_ATTEMPTS)
            .await
            .map_err(|f| f.error)
    }

    /// [`Registers::update`] giving up after `attempts` rounds, for callers that have a
    /// better fallback than waiting.
    pub(crate) async fn update_with_attempts<E, F>(
        &self,
        key: &str,
        mut change: F,
        attempts: usize,
    ) -> Result<Result<Option<Bytes>, E>, UpdateFailure>
    where
        F: FnMut(Option<&Bytes>) -> Result<Option<Bytes>, E> + Send,
        E: Send,
    {
        let n = self.inner.acceptors.len();
        let mut maybe_written = false;
        let mut last_error = String::from("no acceptor answered");
        for attempt in 0..attempts {
            if attempt > 0 {
                let cap = 10u64 << attempt.min(6);
                let ms = rand::rng().random_range(1..=cap);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let ballot = self.next_ballot();

            let mut calls = JoinSet::new();
            for a in &self.inner.acceptors {
                let a = a.clone();
                let req = PrepareRequest {
                    key: key.to_string(),
                    ballot: Some(ballot_to_wire(ballot)),
                };
                calls.spawn(async move { a.prepare(req).await });
            }
            let mut tally = PhaseTally::new(n);
            let mut outcome = Tally::Pending;
            while let Some(joined) = calls.join_next().await {
                outcome = match joined {
                    Ok(Ok(reply)) if reply.promised => {
                        let accepted = reply.accepted.map(|b| ballot_from_wire(Some(b)));
                        match accepted {
                            Some(Err(_)) => tally.failed(),
                            Some(Ok(b)) => tally.promise(Some(b), reply.value),
                            None => tally.promise(None, reply.value),
                        }
                    }
                    Ok(Ok(reply)) => tally.refused(ballot_from_wire(reply.conflict).ok()),
                    Ok(Err(e)) => {
                        last_error = e.to_string();
                        tally.failed()
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        tally.failed()
                    }
                };
                if outcome != Tally::Pending {
                    break;
                }
            }
            drop(calls);
            match outcome {
                Tally::Quorum => {}
                Tally::Lost { outbid } => {
                    self.outbid(outbid);
                    continue;
                }
                Tally::Pending => continue,
            }
            let current = tally.current_value();
            let new = match change(current.as_ref()) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            if new == current && tally.unanimous() {
                // A read (or a no-op change) of a value a majority already accepted.
                return Ok(Ok(new));
            }

            maybe_written = true;
            let mut calls = JoinSet::new();
            for a in &self.inner.acceptors {
                let a = a.clone();
                let req = AcceptRequest {
                    key: key.to_string(),
                    ballot: Some(ballot_to_wire(ballot)),
                    value: new.clone(),
                };
                calls.spawn(async move { a.accept(req).await });
            }
            let mut tally = PhaseTally::new(n);
            let mut outcome = Tally::Pending;
            while let Some(joined) = calls.join_next().await {
                outcome = match joined {
                    Ok(Ok(reply)) if reply.accepted => tally.accepted(),
                    Ok(Ok(reply)) => tally.refused(ballot_from_wire(reply.conflict).ok()),
                    Ok(Err(e)) => {
                        last_error = e.to_string();
                        tally.failed()
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        tally.failed()
                    }
                };
                if outcome != Tally::Pending {
                    break;
                }
            }
            // Answers still outstanding are abandoned; those accepts may land, which is
            // harmless: the value is already chosen at this ballot.
            drop(calls);
            match outcome {
                Tally::Quorum => return Ok(Ok(new)),
                Tally::Lost { outbid } => self.outbid(outbid),
                Tally::Pending => {}
            }
        }
        Err(UpdateFailure {
            error: StorageError::Unavailable(format!(
                "register {key}: no majority after {attempts} attempts ({last_error})"
            )),
            maybe_written,
        })
    }
}

/// An update that gave up.
#[derive(Debug)]
pub(crate) struct UpdateFailure {
    /// Why.
    pub error: StorageError,
    /// Whether an accept was sent, so the new value may still have been chosen.
    pub maybe_written: bool,
}
