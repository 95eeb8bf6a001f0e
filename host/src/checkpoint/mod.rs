//! Durable pipeline state in RocksDB.
//!
//! The checkpoint store is the only place dbmazz keeps state across restarts. It holds,
//! in one RocksDB database under `state.dir`, one column family per concern:
//!
//! | column family   | key                      | value                                  |
//! |-----------------|--------------------------|----------------------------------------|
//! | `positions`     | `checkpoint`, `identity` | [`Checkpoint`], [`Identity`]           |
//! | `batch_intents` | batch id (u64 BE)        | [`BatchIntent`] first/last positions   |
//! | `dead_letters`  | batch id, index (u64 BE, u32 BE) | [`DeadLetter`]                 |
//! | `dead_letter_records` | batch id, index (as `dead_letters`) | the change, replayable (`dlq::record`) |
//! | `dead_letter_replays` | batch id (u64 BE); `next` | replay batch id (u64 BE) and the indices it carries (u32 BE each); the next replay id |
//! | `plugin_kv`     | plugin name, 0, key      | plugin-defined bytes                   |
//! | `snapshot`      | `table/<t>`, `requested/<t>`, `complete/<t>`, `done/<chunk id BE>`, `next_chunk` | [`TablePlan`] (JSON), markers, [`TableComplete`] (JSON), chunk done markers, u64 BE |
//! | `relations`     | relation OID (u32 BE)    | the relation's shape as of the checkpoint (JSON) |
//!
//! Relation shapes: pgoutput announces a relation's shape once per session, so after a
//! restart the first Relation message has nothing to be compared with, and a schema
//! change that was read but never acknowledged would be lost with the restart. The
//! shapes of the relations in an acknowledged stream batch are written with its
//! checkpoint (the same atomic write), and the next start compares the stream's Relation
//! messages with them ([`Store::relations`]): a schema change is delivered until a batch
//! after it is acknowledged (maybe twice, as `apply-schema-change` allows).
//! The ordering rule that makes a crash lose nothing (invariant 1 in
//! `docs/architecture.md`): a batch's intent is written, synced, before the batch is handed
//! to the plugin chain; the checkpoint after an acknowledgement is written, synced, before
//! its LSN is confirmed to PostgreSQL. Every write that carries that rule uses
//! `WriteOptions::set_sync(true)`.
//!
//! ```no_run
//! # fn main() -> Result<(), dbmazz::checkpoint::StoreError> {
//! let store = dbmazz::checkpoint::Store::open(std::path::Path::new("./dbmazz-data"))?;
//! let cp = store.checkpoint()?;
//! println!("resume after {}", cp.confirmed_lsn);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::lsn::Lsn;
use crate::pipeline::change::{BatchId, BatchIntent, Position};
use crate::pipeline::schema::{ColumnInfo, RelationInfo};
use dbmazz_protocol::pgoutput::ReplicaIdentity;

const CF_POSITIONS: &str = "positions";
const CF_INTENTS: &str = "batch_intents";
const CF_DEAD: &str = "dead_letters";
const CF_DEAD_RECORDS: &str = "dead_letter_records";
const CF_REPLAYS: &str = "dead_letter_replays";
const CF_KV: &str = "plugin_kv";
const CF_SNAPSHOT: &str = "snapshot";
const CF_RELATIONS: &str = "relations";
/// Every column family, created at open.
const COLUMN_FAMILIES: [&str; 8] = [
    CF_POSITIONS,
    CF_INTENTS,
    CF_DEAD,
    CF_DEAD_RECORDS,
    CF_REPLAYS,
    CF_KV,
    CF_SNAPSHOT,
    CF_RELATIONS,
];
/// Replay batch ids live above snapshot ids: `2^63 | n`, `n` counting from 1 per store.
pub const REPLAY_BATCH_ID_BASE: u64 = 1 << 63;
const KEY_NEXT_REPLAY: &[u8] = b"next";
const KEY_NEXT_CHUNK: &[u8] = b"next_chunk";
const KEY_CHECKPOINT: &[u8] = b"checkpoint";
const KEY_IDENTITY: &[u8] = b"identity";
const KEY_INCARNATION: &[u8] = b"incarnation";
const FORMAT_VERSION: u8 = 1;

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (open, read, write, sync).
    #[error("checkpoint store at {path}: {source}")]
    Rocks {
        /// The database directory.
        path: PathBuf,
        /// The RocksDB error.
        source: rocksdb::Error,
    },
    /// A stored record does not decode (written by an incompatible version, or corrupt).
    #[error("checkpoint store at {path}: corrupt {what} record")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// Which record.
        what: &'static str,
    },
    /// The store belongs to another database or slot.
    #[error("state directory {path} holds the position of slot {stored_slot:?} on system {stored_system}, but this pipeline uses slot {slot:?} on system {system}: use another state.dir or remove this one")]
    WrongIdentity {
        /// The database directory.
        path: PathBuf,
        /// Stored slot name.
        stored_slot: String,
        /// Stored system identifier.
        stored_system: String,
        /// Configured slot.
        slot: String,
        /// Connected system identifier.
        system: String,
    },
}

/// The durable position of the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// End LSN of the last transaction whose changes are all acknowledged: confirmed to
    /// PostgreSQL as the flush position. Always a commit boundary (or a keepalive
    /// position with nothing in flight).
    pub confirmed_lsn: Lsn,
    /// The last acknowledged change, possibly inside a transaction past
    /// `confirmed_lsn`; changes at or before it are not delivered again.
    pub acked_through: Option<Position>,
    /// The id of the last acknowledged batch.
    pub last_batch_id: BatchId,
}

/// Which slot on which server a state directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `IDENTIFY_SYSTEM`'s systemid.
    pub system_id: String,
    /// Slot name.
    pub slot: String,
}

/// A change that could not be delivered, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The batch it belonged to.
    pub batch_id: BatchId,
    /// Its index in the batch.
    pub index: u32,
    /// Why it was dead-lettered (plugin name and error).
    pub reason: String,
    /// The change, serialized by the caller (JSON), for people to read.
    pub payload: Vec<u8>,
    /// The change in a form that can be delivered again (`dlq::record`); `None` when it
    /// could not be kept that way (a store written before replay existed).
    pub record: Option<Vec<u8>>,
}

/// One chunk of a table's snapshot: the rows a `WHERE` predicate selects.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotChunk {
    /// Unique over the store's life (never reused, also across re-snapshots).
    pub id: u64,
    /// Its position in the table's plan (0-based).
    pub index: u32,
    /// SQL predicate selecting the chunk's rows (a key range or a ctid page range).
    pub predicate: String,
}

/// A table's snapshot plan, stored before any of its chunks is copied.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TablePlan {
    /// `schema.table`.
    pub table: String,
    /// Estimated rows (`pg_class.reltuples`, or a count when never analyzed).
    pub estimate: u64,
    /// The chunks, in key (or page) order; together they cover the table.
    pub chunks: Vec<SnapshotChunk>,
}

/// A table whose snapshot finished.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableComplete {
    /// Milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
}

/// Everything the store knows about snapshots.
#[derive(Clone, Debug, Default)]
pub struct SnapshotState {
    /// Tables whose snapshot is wanted and not finished (planned or not).
    pub requested: std::collections::BTreeSet<String>,
    /// Plans of requested tables, by table.
    pub plans: std::collections::BTreeMap<String, TablePlan>,
    /// Chunks whose rows the sink acknowledged.
    pub done: std::collections::HashSet<u64>,
    /// Tables whose snapshot finished.
    pub complete: std::collections::BTreeMap<String, TableComplete>,
    /// The next free chunk id.
    pub next_chunk: u64,
}

/// The RocksDB-backed store. Cheap to share behind an `Arc`; RocksDB is thread-safe.
pub struct Store {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_pos(out: &mut Vec<u8>, p: Position) {
    put_u64(out, p.commit_lsn.0);
    out.extend_from_slice(&p.seq.to_be_bytes());
}

fn get_pos(b: &[u8], at: usize) -> Option<Position> {
    Some(Position {
        commit_lsn: Lsn(get_u64(b, at)?),
        seq: get_u32(b, at + 8)?,
    })
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT_VERSION];
        put_u64(&mut v, self.confirmed_lsn.0);
        put_u64(&mut v, self.last_batch_id);
        match self.acked_through {
            Some(p) => {
                v.push(1);
                put_pos(&mut v, p);
            }
            None => v.push(0),
        }
        v
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.first() != Some(&FORMAT_VERSION) {
            return None;
        }
        let acked_through = match b.get(17)? {
            0 => None,
            1 => Some(get_pos(b, 18)?),
            _ => return None,
        };
        Some(Checkpoint {
            confirmed_lsn: Lsn(get_u64(b, 1)?),
            last_batch_id: get_u64(b, 9)?,
            acked_through,
        })
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Rocks`] when RocksDB cannot open the directory (permissions, a lock
    /// held by another dbmazz process, corruption).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Small, write-mostly state: keep the footprint small.
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(4 << 20);
        opts.set_keep_log_file_num(2);
        let cfs = COLUMN_FAMILIES
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StoreError::Rocks {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Store {
            db,
            path: dir.to_path_buf(),
        })
    }

    /// Opens the store in `dir` for reading only, without its lock: works while a running
    /// dbmazz holds the store (it sees what was written up to the open).
    ///
    /// # Errors
    /// [`StoreError::Rocks`] when there is no store in `dir`, or it cannot be read.
    pub fn open_read_only(dir: &Path) -> Result<Self, StoreError> {
        let rocks = |source| StoreError::Rocks {
            path: dir.to_path_buf(),
            source,
        };
        // A store written by an older version lacks the newer column families: open
        // the ones it has (reads of the others find nothing).
        let existing = DB::list_cf(&Options::default(), dir).map_err(rocks)?;
        let cfs = COLUMN_FAMILIES
            .into_iter()
            .filter(|n| existing.iter().any(|e| e == n));
        let db = DB::open_cf_for_read_only(&Options::default(), dir, cfs, false).map_err(rocks)?;
        Ok(Store {
            db,
            path: dir.to_path_buf(),
        })
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: &'static str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every column family is created in `open`.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| unreachable!("column family {name} is created at open"))
    }

    /// A column family a store opened read-only may lack (written by an older version).
    fn cf_if_present(&self, name: &str) -> Option<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name)
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// Checks that this store belongs to `identity`, recording it on first use.
    ///
    /// # Errors
    /// [`StoreError::WrongIdentity`] when the store was made for another slot or server.
    pub fn claim(&self, identity: &Identity) -> Result<(), StoreError> {
        let cf = self.cf(CF_POSITIONS);
        match self
            .db
            .get_cf(cf, KEY_IDENTITY)
            .map_err(|e| self.rocks(e))?
        {
            Some(v) => {
                let s = String::from_utf8_lossy(&v);
                let (sys, slot) = s.split_once('\0').ok_or_else(|| self.corrupt("identity"))?;
                if sys != identity.system_id || slot != identity.slot {
                    return Err(StoreError::WrongIdentity {
                        path: self.path.clone(),
                        stored_slot: slot.to_string(),
                        stored_system: sys.to_string(),
                        slot: identity.slot.clone(),
                        system: identity.system_id.clone(),
                    });
                }
                Ok(())
            }
            None => {
                let v = format!("{}\0{}", identity.system_id, identity.slot);
                let mut wb = WriteBatch::default();
                wb.put_cf(cf, KEY_IDENTITY, v);
                wb.put_cf(cf, KEY_INCARNATION, format!("{:016x}", fastrand::u64(..)));
                self.db
                    .write_opt(wb, &Self::synced())
                    .map_err(|e| self.rocks(e))
            }
        }
    }

    /// This state directory's incarnation: 16 random hex digits drawn when the store was
    /// first claimed, so keys derived from batch ids (webhook `Idempotency-Key` and event
    /// ids, StarRocks labels) differ between a pipeline and the same pipeline started over
    /// with a new `state.dir` (whose batch ids start at 1 again). `None` for a store made
    /// by a dbmazz that did not draw one (keys stay as they were).
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn incarnation(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_POSITIONS), KEY_INCARNATION)
            .map_err(|e| self.rocks(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The stored checkpoint (all zero for a new store).
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`] for an undecodable record.
    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_POSITIONS), KEY_CHECKPOINT)
            .map_err(|e| self.rocks(e))?
        {
            Some(v) => Checkpoint::decode(&v).ok_or_else(|| self.corrupt("checkpoint")),
            None => Ok(Checkpoint::default()),
        }
    }

    /// Durably records a batch's intent (synced) before the sink sees it.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn put_intent(&self, intent: &BatchIntent) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(
                self.cf(CF_INTENTS),
                intent.id.to_be_bytes(),
                Self::intent_value(intent),
                &Self::synced(),
            )
            .map_err(|e| self.rocks(e))
    }

    fn intent_value(intent: &BatchIntent) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        put_pos(&mut v, intent.first);
        put_pos(&mut v, intent.last);
        v
    }

    /// Intents with ids above `after`, in id order: batches a sink may have seen but not
    /// acknowledged.
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`].
    pub fn pending_intents(&self, after: BatchId) -> Result<Vec<BatchIntent>, StoreError> {
        let start = (after + 1).to_be_bytes();
        let iter = self.db.iterator_cf(
            self.cf(CF_INTENTS),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let id = get_u64(&k, 0).ok_or_else(|| self.corrupt("batch intent key"))?;
            let (Some(first), Some(last)) = (get_pos(&v, 0), get_pos(&v, 12)) else {
                return Err(self.corrupt("batch intent"));
            };
            out.push(BatchIntent { id, first, last });
        }
        Ok(out)
    }

    /// Durably records `cp` (synced), forgets the intent of batch `cp.last_batch_id`, and
    /// records `next`'s intent, in one atomic write (one fsync). Only after this returns
    /// may `cp.confirmed_lsn` be confirmed to PostgreSQL.
    ///
    /// The acknowledged batch's intent goes with a point delete (a range tombstone per
    /// commit would pile up in RocksDB at thousands of batches per second). Intents at or
    /// below the checkpoint are never read again ([`Store::pending_intents`] reads ids
    /// above it); the few a restart retires (stored batches the stream no longer holds)
    /// are removed by [`Store::forget_intents_through`] at the next start.
    ///
    /// # Errors
    /// RocksDB errors.
    /// `relations` are the shapes of the acknowledged batch's relations that differ from
    /// what the store holds (see the module docs).
    pub fn commit(
        &self,
        cp: &Checkpoint,
        next: Option<&BatchIntent>,
        chunks_done: &[u64],
        relations: &[&RelationInfo],
    ) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for r in relations {
            let v = StoredRelation::encode(r).map_err(|_| self.corrupt("relation shape"))?;
            wb.put_cf(self.cf(CF_RELATIONS), r.id.to_be_bytes(), v);
        }
        for id in chunks_done {
            wb.put_cf(self.cf(CF_SNAPSHOT), Self::done_key(*id), b"");
        }
        wb.put_cf(self.cf(CF_POSITIONS), KEY_CHECKPOINT, cp.encode());
        if cp.last_batch_id > 0 {
            wb.delete_cf(self.cf(CF_INTENTS), cp.last_batch_id.to_be_bytes());
        }
        if let Some(intent) = next {
            wb.put_cf(
                self.cf(CF_INTENTS),
                intent.id.to_be_bytes(),
                Self::intent_value(intent),
            );
        }
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// The relation shapes written with checkpoints: what a restarted stream's Relation
    /// messages are compared with.
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`] for a record that does not decode.
    pub fn relations(&self) -> Result<Vec<RelationInfo>, StoreError> {
        let Some(cf) = self.cf_if_present(CF_RELATIONS) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (_, v) = item.map_err(|e| self.rocks(e))?;
            let r: StoredRelation =
                serde_json::from_slice(&v).map_err(|_| self.corrupt("relation shape"))?;
            out.push(r.decode().ok_or_else(|| self.corrupt("relation shape"))?);
        }
        Ok(out)
    }

    fn done_key(id: u64) -> Vec<u8> {
        let mut k = b"done/".to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    /// The snapshot records (see the module docs).
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`] for a record that does not decode.
    pub fn snapshot_state(&self) -> Result<SnapshotState, StoreError> {
        let mut st = SnapshotState::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SNAPSHOT), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let text = |p: &[u8]| String::from_utf8_lossy(&k[p.len()..]).into_owned();
            if k.as_ref() == KEY_NEXT_CHUNK {
                st.next_chunk = get_u64(&v, 0).ok_or_else(|| self.corrupt("next chunk id"))?;
            } else if k.starts_with(b"done/") {
                st.done
                    .insert(get_u64(&k, 5).ok_or_else(|| self.corrupt("chunk done"))?);
            } else if k.starts_with(b"requested/") {
                st.requested.insert(text(b"requested/"));
            } else if k.starts_with(b"table/") {
                let plan: TablePlan =
                    serde_json::from_slice(&v).map_err(|_| self.corrupt("snapshot plan"))?;
                st.plans.insert(plan.table.clone(), plan);
            } else if k.starts_with(b"complete/") {
                let c: TableComplete =
                    serde_json::from_slice(&v).map_err(|_| self.corrupt("snapshot completion"))?;
                st.complete.insert(text(b"complete/"), c);
            }
        }
        Ok(st)
    }

    /// Records (synced) that `tables` must be snapshotted, forgetting earlier completions
    /// and plans of them (a re-snapshot starts over).
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn request_snapshots(&self, tables: &[String]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let cf = self.cf(CF_SNAPSHOT);
        for t in tables {
            wb.put_cf(cf, format!("requested/{t}"), b"");
            wb.delete_cf(cf, format!("complete/{t}"));
            wb.delete_cf(cf, format!("table/{t}"));
        }
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// Stores (synced) a table's plan and the next free chunk id.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn put_snapshot_plan(&self, plan: &TablePlan, next_chunk: u64) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let cf = self.cf(CF_SNAPSHOT);
        let v = serde_json::to_vec(plan).map_err(|_| self.corrupt("snapshot plan"))?;
        wb.put_cf(cf, format!("table/{}", plan.table), v);
        wb.put_cf(cf, KEY_NEXT_CHUNK, next_chunk.to_be_bytes());
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// Records (synced) that the sink acknowledged every row of these chunks.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn put_chunks_done(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for id in ids {
            wb.put_cf(self.cf(CF_SNAPSHOT), Self::done_key(*id), b"");
        }
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// Records (synced) that `plan`'s table is fully copied: its plan, chunk markers and
    /// request are replaced by a completion record.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn complete_snapshot(&self, plan: &TablePlan) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let cf = self.cf(CF_SNAPSHOT);
        for c in &plan.chunks {
            wb.delete_cf(cf, Self::done_key(c.id));
        }
        wb.delete_cf(cf, format!("table/{}", plan.table));
        wb.delete_cf(cf, format!("requested/{}", plan.table));
        let done = TableComplete {
            finished_at_ms: (crate::metrics::now_us() / 1000).max(0) as u64,
        };
        let v = serde_json::to_vec(&done).map_err(|_| self.corrupt("snapshot completion"))?;
        wb.put_cf(cf, format!("complete/{}", plan.table), v);
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// Deletes the intents of batches `id` and below (one range delete; called once at
    /// start with the checkpoint's last batch id).
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn forget_intents_through(&self, id: BatchId) -> Result<(), StoreError> {
        self.db
            .delete_range_cf(
                self.cf(CF_INTENTS),
                0u64.to_be_bytes(),
                id.saturating_add(1).to_be_bytes(),
            )
            .map_err(|e| self.rocks(e))
    }

    fn dead_letter_key(batch: BatchId, index: u32) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..8].copy_from_slice(&batch.to_be_bytes());
        k[8..].copy_from_slice(&index.to_be_bytes());
        k
    }

    /// Stores dead letters (synced).
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn put_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for l in letters {
            let k = Self::dead_letter_key(l.batch_id, l.index);
            let mut v = (l.reason.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(l.reason.as_bytes());
            v.extend_from_slice(&l.payload);
            wb.put_cf(self.cf(CF_DEAD), k, v);
            match &l.record {
                Some(r) => wb.put_cf(self.cf(CF_DEAD_RECORDS), k, r),
                None => wb.delete_cf(self.cf(CF_DEAD_RECORDS), k),
            }
        }
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    /// All dead letters, in batch and index order.
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`].
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DEAD), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let (Some(batch_id), Some(index), Some(rlen)) =
                (get_u64(&k, 0), get_u32(&k, 8), get_u32(&v, 0))
            else {
                return Err(self.corrupt("dead letter"));
            };
            let rest = v.get(4..).ok_or_else(|| self.corrupt("dead letter"))?;
            let reason = rest
                .get(..rlen as usize)
                .ok_or_else(|| self.corrupt("dead letter"))?;
            let record = match self.cf_if_present(CF_DEAD_RECORDS) {
                Some(cf) => self.db.get_cf(cf, &k).map_err(|e| self.rocks(e))?,
                None => None,
            };
            out.push(DeadLetter {
                batch_id,
                index,
                reason: String::from_utf8_lossy(reason).into_owned(),
                payload: rest[rlen as usize..].to_vec(),
                record,
            });
        }
        Ok(out)
    }

    /// Removes the dead letters of batch `batch` (all of them with `None`), synced;
    /// returns how many were removed.
    ///
    /// # Errors
    /// RocksDB errors (a store opened read-only refuses).
    pub fn purge_dead_letters(&self, batch: Option<BatchId>) -> Result<u64, StoreError> {
        let mut wb = WriteBatch::default();
        let mut n = 0;
        for item in self
            .db
            .iterator_cf(self.cf(CF_DEAD), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            if batch.is_none() || get_u64(&k, 0) == batch {
                wb.delete_cf(self.cf(CF_DEAD), &k);
                wb.delete_cf(self.cf(CF_DEAD_RECORDS), &k);
                n += 1;
            }
        }
        for item in self
            .db
            .iterator_cf(self.cf(CF_REPLAYS), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            let id = (k.len() == 8).then(|| get_u64(&k, 0)).flatten();
            if id.is_some() && (batch.is_none() || id == batch) {
                wb.delete_cf(self.cf(CF_REPLAYS), &k);
            }
        }
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))?;
        Ok(n)
    }

    /// The batch id under which the dead letters `indices` of batch `batch` are replayed:
    /// the same id as a previous replay of exactly these letters (an interrupted replay
    /// sent again is deduplicated by sinks that key on the id), otherwise a new one
    /// (`REPLAY_BATCH_ID_BASE | n`), stored (synced) before it is used. So a replay id
    /// never names two different sets of changes.
    ///
    /// # Errors
    /// RocksDB errors; [`StoreError::Corrupt`].
    pub fn replay_batch_id(&self, batch: BatchId, indices: &[u32]) -> Result<BatchId, StoreError> {
        let cf = self.cf(CF_REPLAYS);
        let key = batch.to_be_bytes();
        let mut planned = Vec::with_capacity(8 + 4 * indices.len());
        if let Some(v) = self.db.get_cf(cf, key).map_err(|e| self.rocks(e))? {
            let id = get_u64(&v, 0).ok_or_else(|| self.corrupt("dead letter replay"))?;
            planned.extend_from_slice(&id.to_be_bytes());
            planned.extend(indices.iter().flat_map(|i| i.to_be_bytes()));
            if v == planned {
                return Ok(id);
            }
        }
        let next = match self
            .db
            .get_cf(cf, KEY_NEXT_REPLAY)
            .map_err(|e| self.rocks(e))?
        {
            Some(v) => get_u64(&v, 0).ok_or_else(|| self.corrupt("dead letter replay"))?,
            None => 1,
        };
        let id = REPLAY_BATCH_ID_BASE | next;
        planned.clear();
        planned.extend_from_slice(&id.to_be_bytes());
        planned.extend(indices.iter().flat_map(|i| i.to_be_bytes()));
        let mut wb = WriteBatch::default();
        wb.put_cf(cf, key, &planned);
        wb.put_cf(cf, KEY_NEXT_REPLAY, next.saturating_add(1).to_be_bytes());
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))?;
        Ok(id)
    }

    /// Removes the dead letters `indices` of batch `batch` and its replay plan (synced):
    /// their replay was acknowledged.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn finish_replay(&self, batch: BatchId, indices: &[u32]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for &i in indices {
            let k = Self::dead_letter_key(batch, i);
            wb.delete_cf(self.cf(CF_DEAD), k);
            wb.delete_cf(self.cf(CF_DEAD_RECORDS), k);
        }
        wb.delete_cf(self.cf(CF_REPLAYS), batch.to_be_bytes());
        self.db
            .write_opt(wb, &Self::synced())
            .map_err(|e| self.rocks(e))
    }

    fn kv_key(namespace: &str, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(namespace.len() + 1 + key.len());
        k.extend_from_slice(namespace.as_bytes());
        k.push(0);
        k.extend_from_slice(key);
        k
    }

    /// A plugin's value for `key` in its own `namespace`.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(CF_KV), Self::kv_key(namespace, key))
            .map_err(|e| self.rocks(e))
    }

    /// Sets a plugin's `key` in its `namespace` (not synced: plugin state rides on the
    /// next synced checkpoint write, which flushes RocksDB's WAL).
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn kv_put(&self, namespace: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db
            .put_cf(self.cf(CF_KV), Self::kv_key(namespace, key), value)
            .map_err(|e| self.rocks(e))
    }

    /// Keys and bytes (keys plus values) a plugin's `namespace` holds.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn kv_usage(&self, namespace: &str) -> Result<(u64, u64), StoreError> {
        let prefix = Self::kv_key(namespace, b"");
        let (mut keys, mut bytes) = (0u64, 0u64);
        for item in self.db.iterator_cf(
            self.cf(CF_KV),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            keys += 1;
            bytes += (k.len() - prefix.len() + v.len()) as u64;
        }
        Ok((keys, bytes))
    }

    /// Deletes a plugin's `key` in its `namespace`.
    ///
    /// # Errors
    /// RocksDB errors.
    pub fn kv_delete(&self, namespace: &str, key: &[u8]) -> Result<(), StoreError> {
        self.db
            .delete_cf(self.cf(CF_KV), Self::kv_key(namespace, key))
            .map_err(|e| self.rocks(e))
    }
}

/// A relation's shape as the `relations` column family stores it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRelation {
    id: u32,
    namespace: String,
    name: String,
    /// `pg_class.relreplident`: d, n, f or i.
    identity: char,
    /// Name, type OID, type modifier, key.
    columns: Vec<(String, u32, i32, bool)>,
}

impl StoredRelation {
    fn encode(r: &RelationInfo) -> serde_json::Result<Vec<u8>> {
        let stored = StoredRelation {
            id: r.id,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            identity: r.replica_identity.as_char(),
            columns: r
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_oid, c.type_modifier, c.key))
                .collect(),
        };
        serde_json::to_vec(&stored)
    }

    fn decode(self) -> Option<RelationInfo> {
        Some(RelationInfo {
            id: self.id,
            namespace: self.namespace,
            name: self.name,
            replica_identity: ReplicaIdentity::from_byte(u8::try_from(self.identity).ok()?)?,
            columns: self
                .columns
                .into_iter()
                .map(|(name, type_oid, type_modifier, key)| ColumnInfo {
                    name,
                    type_oid,
                    type_modifier,
                    key,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(l: u64, s: u32) -> Position {
        Position {
            commit_lsn: Lsn(l),
            seq: s,
        }
    }

    #[test]
    fn checkpoint_and_intents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let shape = RelationInfo {
            id: 16_384,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![ColumnInfo {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                key: true,
            }],
        };
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.checkpoint().unwrap(), Checkpoint::default());
            assert_eq!(s.relations().unwrap(), []);
            let intent = |id: u64| BatchIntent {
                id,
                first: pos(id * 10, 0),
                last: pos(id * 10, 5),
            };
            for id in 1..=2 {
                s.put_intent(&intent(id)).unwrap();
            }
            // Batch 1 acknowledged; batch 3's intent rides on its checkpoint.
            s.commit(
                &Checkpoint {
                    confirmed_lsn: Lsn(15),
                    acked_through: Some(pos(10, 5)),
                    last_batch_id: 1,
                },
                Some(&intent(3)),
                &[],
                &[&shape],
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.relations().unwrap(), [shape]);
        let cp = s.checkpoint().unwrap();
        assert_eq!(cp.confirmed_lsn, Lsn(15));
        assert_eq!(cp.acked_through, Some(pos(10, 5)));
        let pending = s.pending_intents(cp.last_batch_id).unwrap();
        assert_eq!(pending.iter().map(|i| i.id).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(pending[1].last, pos(30, 5));
        assert_eq!(
            s.pending_intents(0).unwrap().len(),
            2,
            "intent 1 was deleted at commit"
        );
        s.forget_intents_through(2).unwrap();
        assert_eq!(
            s.pending_intents(0)
                .unwrap()
                .iter()
                .map(|i| i.id)
                .collect::<Vec<_>>(),
            [3],
            "intents through 2 forgotten"
        );
    }

    #[test]
    fn identity_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let a = Identity {
            system_id: "1".into(),
            slot: "a".into(),
        };
        s.claim(&a).unwrap();
        s.claim(&a).unwrap();
        let e = s
            .claim(&Identity {
                system_id: "1".into(),
                slot: "b".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("slot \"a\""), "{e}");
    }

    #[test]
    fn dead_letters_and_plugin_kv() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let l = DeadLetter {
            batch_id: 4,
            index: 2,
            reason: "sink-webhook: 400".into(),
            payload: b"{}".to_vec(),
            record: Some(b"rec".to_vec()),
        };
        let other = DeadLetter {
            index: 3,
            record: None,
            ..l.clone()
        };
        s.put_dead_letters(&[l.clone(), other.clone()]).unwrap();
        assert_eq!(s.dead_letters().unwrap(), vec![l.clone(), other.clone()]);

        // a replay id is stable for the same letters, new for another set, and never
        // reused once the replay is finished
        let r1 = s.replay_batch_id(4, &[2, 3]).unwrap();
        assert_eq!(r1, REPLAY_BATCH_ID_BASE | 1);
        assert_eq!(s.replay_batch_id(4, &[2, 3]).unwrap(), r1);
        let r2 = s.replay_batch_id(4, &[2]).unwrap();
        assert_ne!(r2, r1);
        s.finish_replay(4, &[2]).unwrap();
        assert_eq!(s.dead_letters().unwrap(), vec![other]);
        assert_ne!(s.replay_batch_id(4, &[2]).unwrap(), r2);
        assert_eq!(s.purge_dead_letters(None).unwrap(), 1);
        assert!(s.dead_letters().unwrap().is_empty());

        s.kv_put("filter", b"k", b"v").unwrap();
        assert_eq!(
            s.kv_get("filter", b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(
            s.kv_get("sink", b"k").unwrap(),
            None,
            "namespaces are separate"
        );
        s.kv_put("filter", b"k2", b"value").unwrap();
        s.kv_put("filter2", b"k3", b"value").unwrap();
        assert_eq!(s.kv_usage("filter").unwrap(), (2, 1 + 1 + 2 + 5));
        s.kv_delete("filter", b"k").unwrap();
        assert_eq!(s.kv_get("filter", b"k").unwrap(), None);
    }
}
