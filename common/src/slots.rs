//! Per-key async locks: one slot per key (a peer address, say), made on first use.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// One slot of state per key, each behind its own async lock: holding one key's slot
/// (dialing one peer, for as long as a connect may take) never blocks another key's.
pub struct KeyedSlots<K, V> {
    slots: Mutex<HashMap<K, Arc<tokio::sync::Mutex<V>>>>,
}

impl<K, V> Default for KeyedSlots<K, V> {
    fn default() -> Self {
        KeyedSlots {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash, V: Default> KeyedSlots<K, V> {
    /// The slot of `key` (a fresh `V::default()` the first time); lock it to use it.
    pub fn slot(&self, key: K) -> Arc<tokio::sync::Mutex<V>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_one_slot_of_its_own() {
        let slots: KeyedSlots<u8, u32> = KeyedSlots::default();
        let a = slots.slot(1);
        *a.try_lock().unwrap() = 7;
        assert_eq!(*slots.slot(1).try_lock().unwrap(), 7);
        // Another key's slot is free while this one is held.
        let held = a.try_lock().unwrap();
        assert_eq!(*slots.slot(2).try_lock().unwrap(), 0);
        drop(held);
    }
}
