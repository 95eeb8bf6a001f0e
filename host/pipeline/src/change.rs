//! What flows through the pipeline: changes, schema changes, batches.

use std::fmt;
use std::sync::Arc;

use dbmazz_protocol::lsn::Lsn;
use dbmazz_protocol::pgoutput::{OldKind, RawDatum, TupleData, Xid};
use dbmazz_protocol::value::{self, Value, ValueError};

use crate::schema::{ColumnInfo, RelationInfo};

/// Where a change sits in the replicated history: its transaction's commit LSN and its
/// ordinal within that transaction (0-based, in WAL order).
///
/// Transactions are delivered in commit order, so positions are totally ordered and a
/// replay from PostgreSQL yields the same position for the same change. Batch intents and
/// the acknowledged position are recorded as positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// LSN of the transaction's commit record.
    pub commit_lsn: Lsn,
    /// Ordinal of the change within the transaction.
    pub seq: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.seq)
    }
}

/// The kind of a row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
    /// TRUNCATE (one change per truncated relation)
    Truncate,
    /// A row copied by the initial (or an added table's) snapshot: the row as it was,
    /// not a change (Debezium's `r`). Sinks apply it as an upsert.
    Read,
}

impl Op {
    /// Lower-case name: `insert`, `update`, `delete`, `truncate`, `read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }
}

/// One committed row change.
#[derive(Clone, Debug)]
pub struct Change {
    /// Stable position (commit LSN, ordinal).
    pub position: Position,
    /// LSN of the change's WAL record (the XLogData start of its message).
    pub lsn: Lsn,
    /// Transaction id (of the subtransaction for streamed transactions).
    pub xid: Xid,
    /// Commit time of the transaction, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// The relation's schema at the time of the change.
    pub relation: Arc<RelationInfo>,
    /// What happened.
    pub op: Op,
    /// Old key or row (Update with a changed key or REPLICA IDENTITY FULL, Delete).
    /// Boxed: most changes are inserts, and a buffered change should stay small.
    pub old: Option<Box<(OldKind, TupleData)>>,
    /// New row (Insert, Update).
    pub new: Option<TupleData>,
    /// Truncate option bits (1 = CASCADE, 2 = RESTART IDENTITY); 0 otherwise.
    pub truncate_options: u8,
}

impl Change {
    /// Bytes of the change's tuples as they arrived (pgoutput TupleData of the old and
    /// new row): what a batch of it weighs, for `pipeline.flush_bytes`.
    pub fn wire_size(&self) -> usize {
        self.old.as_ref().map_or(0, |o| o.1.wire_bytes().len())
            + self.new.as_ref().map_or(0, |n| n.wire_bytes().len())
    }

    /// Decoded values of `tuple` paired with their columns, in column order.
    ///
    /// # Errors
    /// [`ValueError`] for a value that does not parse as its column's type.
    pub fn values<'a>(
        &'a self,
        tuple: &'a TupleData,
    ) -> impl Iterator<Item = (&'a ColumnInfo, Result<Value<'a>, ValueError>)> + 'a {
        self.relation
            .columns
            .iter()
            .zip(tuple.iter())
            .map(|(c, raw): (&ColumnInfo, RawDatum<'a>)| (c, value::decode(c.type_oid, raw)))
    }

    /// Approximate bytes this change holds (values only), for memory accounting.
    pub fn value_bytes(&self) -> usize {
        self.new.as_ref().map_or(0, TupleData::value_bytes)
            + self.old.as_deref().map_or(0, |(_, t)| t.value_bytes())
    }
}

/// A relation's shape changed between two Relation messages.
#[derive(Clone, Debug)]
pub struct SchemaChange {
    /// The shape before.
    pub before: Arc<RelationInfo>,
    /// The shape from now on.
    pub after: Arc<RelationInfo>,
    /// Columns present after but not before (by name).
    pub added: Vec<ColumnInfo>,
    /// Columns present before but not after (by name).
    pub dropped: Vec<ColumnInfo>,
    /// Columns whose type OID or modifier changed: (before, after).
    pub retyped: Vec<(ColumnInfo, ColumnInfo)>,
}

/// A batch id: dense, increasing, and stable across restarts (see `docs/architecture.md`,
/// "Batch ids").
pub type BatchId = u64;

/// The durable record of a batch handed to a consumer: its id and the positions of its
/// first and last change. Written (synced) before the sink sees the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchIntent {
    /// Batch id.
    pub id: BatchId,
    /// Position of the first change.
    pub first: Position,
    /// Position of the last change.
    pub last: Position,
}

/// A batch of changes for the plugin chain.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Stable id; sinks use it as an idempotency key.
    pub id: BatchId,
    /// Position of the first change.
    pub first: Position,
    /// Position of the last change.
    pub last: Position,
    /// Schema changes that take effect before `changes[0]`, in order.
    pub schema_changes: Vec<SchemaChange>,
    /// The changes, in commit order and WAL order within each transaction.
    pub changes: Vec<Change>,
    /// End LSN of the last transaction whose Commit was read before this batch was cut:
    /// once this batch is acknowledged, every change up to it is acknowledged.
    pub watermark: Option<Lsn>,
    /// True when this batch was rebuilt from a stored intent after a restart.
    pub replayed: bool,
    /// When the batch formed (for the stage latencies); `None` for batches made outside
    /// the batcher (snapshot chunks, dead-letter replays, parts of a split batch).
    pub timing: Option<BatchTiming>,
}

/// When a batch formed, on the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchTiming {
    /// Its first change reached the batcher (the reader pushes each change as it is
    /// assembled: for a transaction that is not streamed, when its message arrived).
    pub opened: std::time::Instant,
    /// The batch was cut.
    pub cut: std::time::Instant,
}

impl Batch {
    /// A batch of `changes` made outside the batcher (a snapshot chunk, a part of a split
    /// batch, a conformance case): `first` / `last` are the positions of its first and
    /// last change (the default position when it has none); no schema changes, watermark
    /// or timing, not replayed.
    pub fn of_changes(id: BatchId, changes: Vec<Change>) -> Batch {
        Batch {
            id,
            first: changes.first().map(|c| c.position).unwrap_or_default(),
            last: changes.last().map(|c| c.position).unwrap_or_default(),
            schema_changes: Vec::new(),
            changes,
            watermark: None,
            replayed: false,
            timing: None,
        }
    }

    /// The batch's intent record.
    pub fn intent(&self) -> BatchIntent {
        BatchIntent {
            id: self.id,
            first: self.first,
            last: self.last,
        }
    }
}
