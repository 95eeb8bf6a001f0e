//! Batching: commit-ordered events in, batches with stable ids out.
//!
//! A batch is cut when it holds `flush_size` changes or `flush_bytes` bytes of row data
//! (pgoutput tuples as received), when its oldest change has waited
//! `flush_interval`, or before a schema change (so a schema change always leads the batch
//! it applies to). Batches may end inside a transaction; checkpoints still fall on commit
//! boundaries, through each batch's `watermark` (the end LSN of the last transaction whose
//! Commit preceded the cut).
//!
//! Stable ids after a restart: delivery stores each batch's intent (id, first and last
//! position) before the sink sees the batch. On restart, the batcher is given the
//! intents not yet acknowledged and rebuilds exactly those batches, cutting at their
//! stored last positions and reusing their ids; only then does it go back to cutting by
//! size and time, with fresh ids. Changes at or before the acknowledged position, and
//! transactions already confirmed, are skipped.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::warn;

use dbmazz_protocol::lsn::Lsn;

use crate::assembler::Event;
use crate::change::{Batch, BatchId, BatchIntent, BatchTiming, Change, Position, SchemaChange};

/// A transaction read this long after its commit (or longer; or `flush_interval`, if that
/// is longer) belongs to a backlog being caught up: [`Batcher::cut_at_commit`] leaves its
/// batch to fill.
///
/// It is not `flush_interval` (100 ms by default) because the walsender itself is
/// sometimes that late: on 2 cores shared with the writers, the `server` stage (commit →
/// the walsender sending it) reached p99 114 ms at 20,000 changes/s, and treating those
/// transactions as a backlog held their batch for the rest of `flush_interval` (the
/// `batch` stage's maximum was `flush_interval` exactly). A backlog worth filling batches
/// for is seconds old.
pub const BACKLOG_AGE: Duration = Duration::from_secs(1);

/// Where a restarted pipeline resumes, from the checkpoint store.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// Transactions whose commit LSN is below this end LSN were confirmed: skip them.
    pub confirmed_lsn: Lsn,
    /// Every change at or before this position was acknowledged: skip them.
    pub acked_through: Option<Position>,
    /// The id of the last acknowledged batch; new batches count up from it.
    pub last_batch_id: BatchId,
    /// Intents of batches a sink may have seen but did not acknowledge, in id order:
    /// rebuilt first.
    pub pending: Vec<BatchIntent>,
}

#[derive(Debug)]
struct Open {
    first: Position,
    last: Position,
    changes: Vec<Change>,
    /// Sum of the changes' [`Change::wire_size`].
    bytes: usize,
    schema_changes: Vec<SchemaChange>,
    opened: Instant,
    watermark: Option<Lsn>,
}

/// Cuts batches. See the module docs.
#[derive(Debug)]
pub struct Batcher {
    flush_size: usize,
    flush_bytes: usize,
    flush_interval: Duration,
    next_id: BatchId,
    replay: VecDeque<BatchIntent>,
    confirmed_lsn: Lsn,
    acked_through: Option<Position>,
    skipping_txn: bool,
    /// Between a Begin and its Commit.
    in_txn: bool,
    pending_schema: Vec<SchemaChange>,
    open: Option<Open>,
    pending_watermark: Option<Lsn>,
    /// Batches cut but not yet returned (one push can cut two).
    ready: VecDeque<Batch>,
}

impl Batcher {
    /// A batcher cutting at `flush_size` changes or after `flush_interval`, resuming
    /// from `resume`.
    pub fn new(flush_size: usize, flush_interval: Duration, resume: Resume) -> Self {
        Batcher {
            flush_size: flush_size.max(1),
            flush_bytes: usize::MAX,
            flush_interval,
            next_id: resume.last_batch_id + 1,
            replay: resume.pending.into(),
            confirmed_lsn: resume.confirmed_lsn,
            acked_through: resume.acked_through,
            skipping_txn: false,
            in_txn: false,
            pending_schema: Vec::new(),
            open: None,
            pending_watermark: None,
            ready: VecDeque::new(),
        }
    }

    /// Also cuts a batch once its changes weigh `bytes` (their tuples as received), so
    /// 10,000 rows of 1 MB do not make a 10 GB batch. A single larger change still
    /// makes a batch of its own.
    pub fn with_flush_bytes(mut self, bytes: usize) -> Self {
        self.flush_bytes = bytes.max(1);
        self
    }

    /// True while batches are being rebuilt from stored intents.
    pub fn replaying(&self) -> bool {
        !self.replay.is_empty()
    }

    /// True when a batch is open (has at least one change).
    pub fn has_open(&self) -> bool {
        self.open.is_some()
    }

    /// When the open batch must be cut by time, if one is open and time cuts apply.
    pub fn deadline(&self) -> Option<Instant> {
        if self.replaying() {
            return None;
        }
        self.open.as_ref().map(|o| o.opened + self.flush_interval)
    }

    /// Feeds one event; returns a batch when one was cut.
    pub fn push(&mut self, event: Event) -> Option<Batch> {
        match event {
            Event::Begin { commit_lsn, .. } => {
                self.skipping_txn = commit_lsn < self.confirmed_lsn;
                self.in_txn = true;
                None
            }
            Event::Commit { end_lsn, .. } => {
                self.in_txn = false;
                if std::mem::take(&mut self.skipping_txn) || end_lsn <= self.confirmed_lsn {
                    return None;
                }
                match &mut self.open {
                    Some(o) => o.watermark = Some(end_lsn),
                    None => self.pending_watermark = Some(end_lsn),
                }
                None
            }
            Event::Schema(sc) => {
                if self.skipping_txn {
                    return None;
                }
                let cut = self.cut();
                self.pending_schema.push(sc);
                cut
            }
            Event::Message { .. } => None,
            Event::Change(c) => self.push_change(c),
        }
    }

    fn push_change(&mut self, c: Change) -> Option<Batch> {
        if self.skipping_txn {
            return None;
        }
        if self.acked_through.is_some_and(|a| c.position <= a) {
            // A schema change rides in the batch of the next change kept: one pending
            // before an acknowledged change was delivered with it, or is the replay
            // comparing a transaction's first Relation message with the shape stored
            // after it (a transaction whose shape changed midway): either way not news.
            self.pending_schema.clear();
            return None;
        }
        // Rebuilding a stored batch whose last change we have passed (the stream
        // differs from the one the intent was made from): close it here.
        let mut early = None;
        if let (Some(intent), Some(o)) = (self.replay.front(), &self.open) {
            if c.position > intent.last {
                warn!(
                    batch = intent.id,
                    expected_last = %intent.last,
                    actual_last = %o.last,
                    "replayed stream diverged from the stored batch intent; closing the batch early"
                );
                early = self.cut();
            }
        }
        let pos = c.position;
        let size = c.wire_size();
        // Stored batches whose range lies wholly before this change, with nothing open:
        // the stream no longer has their changes. Drop them; their ids are not reused.
        while self.open.is_none() {
            match self.replay.front() {
                Some(intent) if pos > intent.last => {
                    warn!(batch = intent.id, last = %intent.last, "a stored batch no longer appears in the stream; its id is retired");
                    self.next_ready_id_after(intent.id);
                    self.replay.pop_front();
                }
                _ => break,
            }
        }
        match &mut self.open {
            Some(o) => {
                o.last = pos;
                o.bytes += size;
                o.changes.push(c);
            }
            None => {
                let mut changes = Vec::with_capacity(self.flush_size.min(16_384));
                changes.push(c);
                self.open = Some(Open {
                    first: pos,
                    last: pos,
                    changes,
                    bytes: size,
                    schema_changes: std::mem::take(&mut self.pending_schema),
                    opened: Instant::now(),
                    watermark: None,
                });
            }
        }
        let full = match self.replay.front() {
            Some(intent) => pos >= intent.last,
            None => self
                .open
                .as_ref()
                .is_some_and(|o| o.changes.len() >= self.flush_size || o.bytes >= self.flush_bytes),
        };
        if full {
            if let Some(b) = self.cut() {
                if early.is_some() {
                    // Both the early batch and this one: return the first, queue this.
                    self.ready.push_back(b);
                } else {
                    return Some(b);
                }
            }
        }
        early
    }

    fn next_ready_id_after(&mut self, id: BatchId) {
        if id >= self.next_id {
            self.next_id = id + 1;
        }
    }

    /// A batch cut by the last `push` beyond the one it returned. Call until `None`
    /// after every `push`.
    pub fn next_ready(&mut self) -> Option<Batch> {
        self.ready.pop_front()
    }

    /// Cuts the open batch if its time is up (`now` ≥ [`Batcher::deadline`]).
    pub fn tick(&mut self, now: Instant) -> Option<Batch> {
        match self.deadline() {
            Some(d) if now >= d => self.cut(),
            _ => None,
        }
    }

    /// Cuts the open batch early if it ends at a commit (no transaction is half in it),
    /// and no stored batch is being rebuilt (their cuts are fixed).
    ///
    /// The reader calls this when it has read everything the server sent so far and
    /// the sink has acknowledged every batch handed on: a quiet stream's changes then go
    /// out at once instead of after `flush_interval`, while a busy one fills batches (the
    /// sink is still writing the last one, or more data is already there). Group commit,
    /// in effect.
    ///
    /// Only for fresh changes: when the open batch's last transaction committed more than
    /// [`BACKLOG_AGE`] (or `flush_interval`, if longer) before `now_us` (µs since the Unix
    /// epoch), the stream is a backlog being caught up, where full batches matter more
    /// than latency (on the benchmark's W2, cutting at every catch-up cost a fifth of the
    /// throughput).
    pub fn cut_at_commit(&mut self, now_us: i64) -> Option<Batch> {
        if !self.can_cut_at_commit(now_us) {
            return None;
        }
        self.cut()
    }

    /// True when [`Batcher::cut_at_commit`] would cut.
    pub fn can_cut_at_commit(&self, now_us: i64) -> bool {
        let backlog_us = self.flush_interval.max(BACKLOG_AGE).as_micros() as i64;
        let fresh = |c: &Change| now_us.saturating_sub(c.commit_time_us) < backlog_us;
        !self.in_txn
            && !self.replaying()
            && self
                .open
                .as_ref()
                .is_some_and(|o| o.changes.last().is_some_and(fresh))
    }

    /// Cuts the open batch now, whatever its size (used when draining). While stored
    /// batches are being rebuilt, the open batch is dropped instead: cutting it would give
    /// its stored id to part of its changes, and it was not acknowledged, so the next start
    /// rebuilds it whole.
    pub fn flush(&mut self) -> Option<Batch> {
        if self.replaying() {
            if let Some(o) = self.open.take() {
                tracing::info!(first = %o.first, changes = o.changes.len(), "dropping a partly rebuilt batch at shutdown; it is rebuilt at the next start");
            }
            return None;
        }
        self.cut()
    }

    /// The server reported (keepalive) that everything before `wal_end` was sent, and
    /// nothing is open upstream: once what was handed on is acknowledged, `wal_end` may
    /// be confirmed.
    pub fn idle_position(&mut self, wal_end: Lsn) {
        if self.open.is_none() && wal_end > self.confirmed_lsn {
            self.pending_watermark =
                Some(self.pending_watermark.map_or(wal_end, |w| w.max(wal_end)));
        }
    }

    /// True when commits or an idle position wait to be handed on as a watermark.
    pub fn has_pending_watermark(&self) -> bool {
        self.pending_watermark.is_some()
    }

    /// Takes the watermark of commits seen since the last batch, when no batch is open.
    pub fn take_watermark(&mut self) -> Option<Lsn> {
        if self.open.is_some() {
            return None;
        }
        self.pending_watermark.take()
    }

    fn cut(&mut self) -> Option<Batch> {
        let o = self.open.take()?;
        let (id, replayed) = match self.replay.pop_front() {
            Some(intent) => {
                if intent.first != o.first {
                    warn!(batch = intent.id, expected = %intent.first, actual = %o.first,
                        "replayed batch starts at a different position than its stored intent");
                }
                (intent.id, true)
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                (id, false)
            }
        };
        if id >= self.next_id {
            self.next_id = id + 1;
        }
        let watermark = match (self.pending_watermark.take(), o.watermark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Some(Batch {
            id,
            first: o.first,
            last: o.last,
            schema_changes: o.schema_changes,
            changes: o.changes,
            watermark,
            replayed,
            timing: Some(BatchTiming {
                opened: o.opened,
                cut: Instant::now(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assembler::{Assembler, Step};
    use bytes::Bytes;
    use dbmazz_protocol::pgoutput::encode::{self, Val};

    type Cut = (BatchId, Vec<(u64, u32)>, Option<Lsn>);

    /// Runs a scripted stream of `txns` transactions of `per_txn` inserts through an
    /// assembler and a batcher; returns the batches as (id, [(commit lsn, seq)]).
    fn run(batcher: &mut Batcher, txns: u64, per_txn: u32) -> Vec<Cut> {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let mut out = Vec::new();
        let mut batches = Vec::new();
        let mut msgs = Vec::new();
        for t in 0..txns {
            let commit = Lsn(1000 * (t + 1));
            msgs.push(encode::begin(commit, 0, t as u32));
            msgs.push(encode::relation(
                None,
                1,
                "public",
                "t",
                b'd',
                &[(true, "id", 23, -1)],
            ));
            for _ in 0..per_txn {
                msgs.push(encode::insert(None, 1, &[Val::Text("1")]));
            }
            msgs.push(encode::commit(commit, Lsn(commit.0 + 10), 0));
        }
        for m in msgs {
            let step = a.handle(Lsn(1), Bytes::from(m), &mut out).unwrap();
            assert!(!matches!(step, Step::Replay(_)));
            for e in out.drain(..) {
                if let Some(b) = batcher.push(e) {
                    batches.push(b);
                }
                while let Some(b) = batcher.next_ready() {
                    batches.push(b);
                }
            }
        }
        if let Some(b) = batcher.flush() {
            batches.push(b);
        }
        batches
            .into_iter()
            .map(|b| {
                (
                    b.id,
                    b.changes
                        .iter()
                        .map(|c| (c.position.commit_lsn.0, c.position.seq))
                        .collect(),
                    b.watermark,
                )
            })
            .collect()
    }

    #[test]
    fn cuts_by_size_across_transactions_with_commit_watermarks() {
        let mut b = Batcher::new(4, Duration::from_secs(60), Resume::default());
        let got = run(&mut b, 3, 3);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, 1);
        assert_eq!(got[0].1, vec![(1000, 0), (1000, 1), (1000, 2), (2000, 0)]);
        assert_eq!(got[0].2, Some(Lsn(1010)), "txn 1 committed inside batch 1");
        assert_eq!(got[1].1, vec![(2000, 1), (2000, 2), (3000, 0), (3000, 1)]);
        assert_eq!(got[1].2, Some(Lsn(2010)));
        assert_eq!(got[2].2, Some(Lsn(3010)));
    }

    #[test]
    fn cuts_by_bytes_of_row_data() {
        // each insert's tuple is 8 bytes on the wire (column count, 't', length, "1")
        let mut b =
            Batcher::new(100, Duration::from_secs(60), Resume::default()).with_flush_bytes(20);
        let got = run(&mut b, 3, 3);
        let sizes: Vec<usize> = got.iter().map(|c| c.1.len()).collect();
        assert_eq!(sizes, [3, 3, 3], "cut once 3 changes weigh 24 >= 20 bytes");
        // a single change above the cap still makes a batch (of its own)
        let mut b =
            Batcher::new(100, Duration::from_secs(60), Resume::default()).with_flush_bytes(1);
        assert_eq!(run(&mut b, 1, 2).len(), 2);
    }

    #[test]
    fn restart_rebuilds_pending_batches_with_the_same_ids_and_skips_acked() {
        let mut b = Batcher::new(4, Duration::from_secs(60), Resume::default());
        let first = run(&mut b, 3, 3);
        // Batch 1 was acknowledged (checkpoint: confirmed 1010, acked through 2000#0);
        // batches 2 and 3 were handed on but not acknowledged. Restart with a different
        // flush size: the pending batches must come back identical.
        let pending = vec![
            BatchIntent {
                id: 2,
                first: Position {
                    commit_lsn: Lsn(2000),
                    seq: 1,
                },
                last: Position {
                    commit_lsn: Lsn(3000),
                    seq: 1,
                },
            },
            BatchIntent {
                id: 3,
                first: Position {
                    commit_lsn: Lsn(3000),
                    seq: 2,
                },
                last: Position {
                    commit_lsn: Lsn(3000),
                    seq: 2,
                },
            },
        ];
        let resume = Resume {
            confirmed_lsn: Lsn(1010),
            acked_through: Some(Position {
                commit_lsn: Lsn(2000),
                seq: 0,
            }),
            last_batch_id: 1,
            pending,
        };
        let mut b = Batcher::new(100, Duration::from_secs(60), resume);
        // PostgreSQL resends from the confirmed LSN; here the script resends everything,
        // so the confirmed transaction must be skipped too.
        let again = run(&mut b, 3, 3);
        assert_eq!(again[0].0, 2);
        assert_eq!(again[0].1, first[1].1);
        assert_eq!(again[1].0, 3);
        assert_eq!(again[1].1, first[2].1);
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn a_replayed_transaction_that_changed_shape_midway_reports_no_schema_change() {
        // A transaction altered its table between two changes; both batches (cut at the
        // schema change) were acknowledged before its Commit, so the checkpoint stored
        // the new shape while the confirmed LSN stayed before the transaction. The
        // replay's first Relation message (the old shape) differs from the stored one.
        const OLD: &[(bool, &str, u32, i32)] = &[(true, "id", 23, -1)];
        const NEW: &[(bool, &str, u32, i32)] = &[(true, "id", 23, -1), (false, "c", 23, -1)];
        let stored = match dbmazz_protocol::pgoutput::parse(
            Bytes::from(encode::relation(None, 1, "public", "t", b'd', NEW)),
            false,
        )
        .unwrap()
        {
            dbmazz_protocol::pgoutput::Message::Relation(r) => {
                crate::schema::RelationInfo::from_message(&r)
            }
            _ => unreachable!(),
        };
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20)
            .unwrap()
            .with_relations([stored]);
        let resume = Resume {
            confirmed_lsn: Lsn(10),
            acked_through: Some(Position {
                commit_lsn: Lsn(1000),
                seq: 1,
            }),
            last_batch_id: 2,
            pending: Vec::new(),
        };
        let mut b = Batcher::new(100, Duration::from_secs(60), resume);
        let msgs = vec![
            encode::begin(Lsn(1000), 0, 7),
            encode::relation(None, 1, "public", "t", b'd', OLD),
            encode::insert(None, 1, &[Val::Text("1")]),
            encode::relation(None, 1, "public", "t", b'd', NEW),
            encode::insert(None, 1, &[Val::Text("2"), Val::Text("2")]),
            encode::insert(None, 1, &[Val::Text("3"), Val::Text("3")]),
            encode::commit(Lsn(1000), Lsn(1010), 0),
        ];
        let mut out = Vec::new();
        let mut batches = Vec::new();
        for m in msgs {
            a.handle(Lsn(1), Bytes::from(m), &mut out).unwrap();
            for e in out.drain(..) {
                batches.extend(b.push(e));
            }
        }
        batches.extend(b.flush());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].changes.len(), 1, "only the change after the ack");
        assert!(
            batches[0].schema_changes.is_empty(),
            "{:?}",
            batches[0].schema_changes
        );
    }

    #[test]
    fn a_diverged_replay_loses_no_change() {
        // Stored: batch 2 = 1000#0..1000#5, batch 3 = 1000#6..1000#7. The stream now has
        // only 3 changes in the transaction at 1000, then a transaction at 2000.
        let pending = vec![
            BatchIntent {
                id: 2,
                first: Position {
                    commit_lsn: Lsn(1000),
                    seq: 0,
                },
                last: Position {
                    commit_lsn: Lsn(1000),
                    seq: 5,
                },
            },
            BatchIntent {
                id: 3,
                first: Position {
                    commit_lsn: Lsn(1000),
                    seq: 6,
                },
                last: Position {
                    commit_lsn: Lsn(1000),
                    seq: 7,
                },
            },
        ];
        let mut b = Batcher::new(
            100,
            Duration::from_secs(60),
            Resume {
                last_batch_id: 1,
                pending,
                ..Resume::default()
            },
        );
        let got = run(&mut b, 2, 3);
        let all: Vec<(u64, u32)> = got.iter().flat_map(|(_, c, _)| c.clone()).collect();
        assert_eq!(
            all,
            vec![
                (1000, 0),
                (1000, 1),
                (1000, 2),
                (2000, 0),
                (2000, 1),
                (2000, 2)
            ],
            "every change delivered once: {got:?}"
        );
        let ids: Vec<u64> = got.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(
            ids,
            vec![2, 4],
            "batch 2 keeps its id for its surviving start; batch 3's id is retired, not reused"
        );
    }

    #[test]
    fn a_drain_during_replay_does_not_reuse_the_id_for_part_of_the_batch() {
        let pending = vec![BatchIntent {
            id: 5,
            first: Position {
                commit_lsn: Lsn(1000),
                seq: 0,
            },
            last: Position {
                commit_lsn: Lsn(1000),
                seq: 9,
            },
        }];
        let mut b = Batcher::new(
            100,
            Duration::from_secs(60),
            Resume {
                last_batch_id: 4,
                pending,
                ..Resume::default()
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let mut out = Vec::new();
        for m in [
            encode::begin(Lsn(1000), 0, 1),
            encode::relation(None, 1, "public", "t", b'd', &[(true, "id", 23, -1)]),
            encode::insert(None, 1, &[Val::Text("1")]),
        ] {
            a.handle(Lsn(1), Bytes::from(m), &mut out).unwrap();
        }
        for e in out.drain(..) {
            assert!(b.push(e).is_none());
        }
        assert!(
            b.flush().is_none(),
            "batch 5 is not cut with 1 of its 10 changes"
        );
    }

    /// Feeds `messages` through an assembler into `b`, expecting no cut.
    fn feed_uncut(a: &mut Assembler, b: &mut Batcher, messages: Vec<Vec<u8>>) {
        let mut out = Vec::new();
        for m in messages {
            a.handle(Lsn(1), Bytes::from(m), &mut out).unwrap();
        }
        for e in out.drain(..) {
            assert!(b.push(e).is_none());
        }
    }

    /// A transaction with commit LSN 50 opening on table `public.t`, with `ids` inserted.
    fn open_txn(ids: &[&str]) -> Vec<Vec<u8>> {
        let mut m = vec![
            encode::begin(Lsn(50), 0, 1),
            encode::relation(None, 1, "public", "t", b'd', &[(true, "id", 23, -1)]),
        ];
        m.extend(
            ids.iter()
                .map(|id| encode::insert(None, 1, &[Val::Text(id)])),
        );
        m
    }

    #[test]
    fn time_cut_and_idle_watermark() {
        let mut b = Batcher::new(100, Duration::from_millis(0), Resume::default());
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        feed_uncut(&mut a, &mut b, open_txn(&["1"]));
        let batch = b.tick(Instant::now()).unwrap();
        assert_eq!(batch.changes.len(), 1);
        assert_eq!(
            batch.watermark, None,
            "the transaction has not committed yet"
        );
        feed_uncut(&mut a, &mut b, vec![encode::commit(Lsn(50), Lsn(60), 0)]);
        assert_eq!(b.take_watermark(), Some(Lsn(60)));
        b.idle_position(Lsn(90));
        assert_eq!(b.take_watermark(), Some(Lsn(90)));
        assert_eq!(b.take_watermark(), None);
    }

    #[test]
    fn cut_at_commit_waits_for_the_commit_and_not_for_the_interval() {
        let mut b = Batcher::new(100, Duration::from_millis(100), Resume::default());
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        // `open_txn`'s transaction committed at the Unix epoch
        let now = 1_000;
        feed_uncut(&mut a, &mut b, open_txn(&["1", "2"]));
        assert!(!b.can_cut_at_commit(now), "inside a transaction");
        assert!(b.cut_at_commit(now).is_none());
        feed_uncut(&mut a, &mut b, vec![encode::commit(Lsn(50), Lsn(60), 0)]);
        assert!(b.can_cut_at_commit(now));
        assert!(
            !b.can_cut_at_commit(3_600_000_000),
            "an hour-old commit is a backlog: wait for a full batch"
        );
        assert!(
            b.can_cut_at_commit(500_000),
            "a commit the walsender sent 500 ms late is not a backlog"
        );
        assert!(!b.can_cut_at_commit(BACKLOG_AGE.as_micros() as i64));
        let batch = b.cut_at_commit(now).unwrap();
        assert_eq!(batch.changes.len(), 2);
        assert_eq!(batch.watermark, Some(Lsn(60)));
        assert!(!b.can_cut_at_commit(now), "nothing open");
    }
}
