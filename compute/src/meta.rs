//! The metadata store compute uses: the storage tier's CASPaxos registers, or (for a node
//! started without storage, as unit tests do) a process-local map with the same contract.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use warren_storage::StorageError;
use warren_storage::client::Registers;

/// Linearizable single-key registers.
#[derive(Clone)]
pub enum Meta {
    /// Replicated registers on the storage nodes.
    Registers(Registers),
    /// A local map (no durability, one node).
    Memory(Arc<Mutex<HashMap<String, Bytes>>>),
}

impl Meta {
    /// A fresh local store.
    pub fn memory() -> Self {
        Meta::Memory(Arc::new(Mutex::new(HashMap::new())))
    }

    /// Read a register.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        match self {
            Meta::Registers(r) => r.get(key).await,
            Meta::Memory(m) => Ok(m
                .lock()
                .map_err(|_| StorageError::Corrupt("metadata lock poisoned".into()))?
                .get(key)
                .cloned()),
        }
    }

    /// Read-modify-write a register; `change` must be a pure function of its input.
    pub async fn update<F>(&self, key: &str, mut change: F) -> Result<Option<Bytes>, StorageError>
    where
        F: FnMut(Option<&Bytes>) -> Option<Bytes> + Send,
    {
        match self {
            Meta::Registers(r) => {
                let res: Result<Option<Bytes>, std::convert::Infallible> =
                    r.update(key, |cur| Ok(change(cur))).await?;
                match res {
                    Ok(v) => Ok(v),
                    Err(never) => match never {},
                }
            }
            Meta::Memory(m) => {
                let mut map = m
                    .lock()
                    .map_err(|_| StorageError::Corrupt("metadata lock poisoned".into()))?;
                let new = change(map.get(key));
                match &new {
                    Some(v) => {
                        map.insert(key.to_string(), v.clone());
                    }
                    None => {
                        map.remove(key);
                    }
                }
                Ok(new)
            }
        }
    }
}
