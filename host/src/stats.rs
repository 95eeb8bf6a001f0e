//! Counters of a running pipeline, shared between its tasks (lock-free atomics).
//! The control plane's metrics read them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pipeline::change::Batch;

/// Pipeline counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// pgoutput bytes received (XLogData payloads).
    pub bytes_received: AtomicU64,
    /// Messages received.
    pub messages_received: AtomicU64,
    /// Changes acknowledged by the sink.
    pub changes_delivered: AtomicU64,
    /// Batches acknowledged by the sink.
    pub batches_delivered: AtomicU64,
    /// Last LSN received.
    pub received_lsn: AtomicU64,
    /// Last LSN confirmed to PostgreSQL.
    pub confirmed_lsn: AtomicU64,
    /// Changes sent to the dead-letter store.
    pub dead_letters: AtomicU64,
}

impl Stats {
    /// Counts an acknowledged batch.
    pub fn record_batch(&self, batch: &Batch) {
        self.changes_delivered
            .fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
        self.batches_delivered.fetch_add(1, Ordering::Relaxed);
    }
}
