//! Locking that survives a panic elsewhere: Pacer's shared state behind a `Mutex` is
//! plain data (maps, counters, logs) that stays consistent if a holder panicked, so a
//! poisoned lock is taken over rather than spreading the panic.
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a panicking holder poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
