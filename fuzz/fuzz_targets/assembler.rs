//! The assembler and the batcher over any sequence of pgoutput messages: sequences shaped
//! like the protocol, built from the input (transactions, origins, relations changing
//! shape, streamed transactions interleaved, aborted whole or by subtransaction, spilled
//! at any threshold), mixed with arbitrary bytes. Never a panic, and while the messages
//! are ones the model below understands:
//!
//! - changes and transactional messages leave the assembler only between a Begin and
//!   its Commit, with the transaction's commit LSN and rising ordinals;
//! - each change leaves it once; every change of a committed transaction leaves it
//!   (none when its origin is skipped) and no change of an aborted streamed transaction
//!   or subtransaction does;
//! - the batches, cut at any size, hold exactly the changes that left the assembler, in
//!   order, with ids counting up by one.
//!
//! The input is a program: each op is a byte choosing a message, then its arguments.
//! Every DML message carries a unique tag (a number) in its first column, so the checks
//! can follow each change.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use dbmazz_pipeline::assembler::{Assembler, Event, Step};
use dbmazz_pipeline::batcher::{Batcher, Resume};
use dbmazz_pipeline::change::{Batch, Change, Position};
use dbmazz_protocol::lsn::Lsn;
use dbmazz_protocol::pgoutput::encode::{self, Val};
use dbmazz_protocol::pgoutput::{self, OldKind, RawDatum};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Shapes a relation may take: (key, name, type oid, typmod) per column.
const SHAPES: [&[(bool, &str, u32, i32)]; 4] = [
    &[(true, "id", 25, -1), (false, "v", 25, -1)],
    &[(true, "id", 25, -1), (false, "v", 23, -1)],
    &[
        (true, "id", 25, -1),
        (false, "v", 25, -1),
        (false, "w", 1043, 14),
    ],
    &[(false, "id", 25, -1), (true, "v2", 25, -1)],
];

/// The transaction messages are being written into, as the model sees it.
#[derive(Default)]
struct Txn {
    tags: Vec<(u64, u32)>,
    skip: bool,
    /// Subtransactions aborted so far: the assembler drops their frames at the replay,
    /// also frames that came after the abort (PostgreSQL never sends any; the program
    /// may).
    aborted_subs: HashSet<u32>,
}

#[derive(Default)]
struct Model {
    /// False once an arbitrary message was accepted: the checks that need to know what
    /// was sent stop there.
    exact: bool,
    plain: Option<Txn>,
    streams: HashMap<u32, Txn>,
    in_stream: Option<u32>,
    aborted: HashSet<u64>,
    /// Tags that must have left the assembler by now.
    committed: Vec<u64>,
    /// Tags of skipped transactions: must never leave it.
    skipped: HashSet<u64>,
}

/// What left the assembler, checked as it leaves.
#[derive(Default)]
struct Emitted {
    open: Option<(Lsn, Option<u32>)>,
    tags: HashSet<u64>,
    positions: Vec<Position>,
}

impl Emitted {
    fn check(&mut self, event: &Event, exact: bool) {
        match event {
            Event::Begin { commit_lsn, .. } => {
                assert!(self.open.is_none(), "Begin inside a transaction");
                self.open = Some((*commit_lsn, None));
            }
            Event::Commit { commit_lsn, .. } => {
                let (open, _) = self.open.take().expect("Commit outside a transaction");
                assert_eq!(open, *commit_lsn, "Commit of another transaction");
            }
            Event::Change(c) => {
                self.at(c.position);
                self.positions.push(c.position);
                if let (Some(tag), true) = (tag(c), exact) {
                    assert!(self.tags.insert(tag), "change {tag} left twice");
                }
            }
            Event::Message { position, .. } => self.at(*position),
            Event::Schema(_) => {}
        }
    }

    fn at(&mut self, position: Position) {
        let (commit_lsn, last) = self.open.as_mut().expect("a change outside a transaction");
        assert_eq!(
            position.commit_lsn, *commit_lsn,
            "change of another transaction"
        );
        assert!(
            last.is_none_or(|l| position.seq >= l),
            "ordinals go back: {last:?} then {}",
            position.seq
        );
        *last = Some(position.seq);
    }
}

fn tag(c: &Change) -> Option<u64> {
    let tuple = c.new.as_ref().or(c.old.as_deref().map(|(_, t)| t))?;
    match tuple.get(0)? {
        RawDatum::Text(s) => s.parse().ok(),
        _ => None,
    }
}

struct Run {
    assembler: Assembler,
    batcher: Batcher,
    batches: Vec<Batch>,
    emitted: Emitted,
    model: Model,
    wal: u64,
    next_tag: u64,
}

impl Run {
    /// Feeds one message; false when the assembler refused it (the host stops there).
    fn feed(&mut self, msg: Vec<u8>) -> bool {
        self.wal += 16;
        if trace() {
            let parsed = pgoutput::parse(Bytes::from(msg.clone()), self.model.in_stream.is_some());
            eprintln!("message {parsed:?}");
        }
        let mut out = Vec::new();
        let step = match self
            .assembler
            .handle(Lsn(self.wal), Bytes::from(msg), &mut out)
        {
            Ok(step) => step,
            Err(_) => return false,
        };
        self.hand_on(&mut out);
        if let Step::Replay(mut txn) = step {
            loop {
                match self.assembler.replay(&mut txn, &mut out) {
                    Ok(more) => {
                        self.hand_on(&mut out);
                        if !more {
                            break;
                        }
                    }
                    Err(_) => return false,
                }
            }
        }
        true
    }

    fn hand_on(&mut self, out: &mut Vec<Event>) {
        for event in out.drain(..) {
            if trace() {
                eprintln!("  event {event:?}");
            }
            self.emitted.check(&event, self.model.exact);
            if let Some(b) = self.batcher.push(event) {
                self.batches.push(b);
            }
            while let Some(b) = self.batcher.next_ready() {
                self.batches.push(b);
            }
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Where a DML message goes: `(message xid, top-level xid)`, `None` for a plain
    /// transaction.
    fn target(&self, u: &mut Unstructured<'_>) -> Result<(Option<u32>, Option<u32>)> {
        Ok(match self.model.in_stream {
            Some(top) => {
                let xid = if u.ratio(1, 3)? { top + 1000 } else { top };
                (Some(xid), Some(top))
            }
            None => (None, None),
        })
    }

    fn record(&mut self, top: Option<u32>, xid: Option<u32>, tag: u64) {
        let txn = match top {
            Some(top) => self.model.streams.entry(top).or_default(),
            None => match self.model.plain.as_mut() {
                Some(t) => t,
                None => return,
            },
        };
        let sub = xid.unwrap_or(0);
        if txn.aborted_subs.contains(&sub) {
            self.model.aborted.insert(tag);
        } else {
            txn.tags.push((tag, sub));
        }
    }

    fn finish(&mut self, txn: Txn) {
        let tags = txn.tags.into_iter().map(|(t, _)| t);
        if txn.skip {
            self.model.skipped.extend(tags);
        } else {
            self.model.committed.extend(tags);
        }
    }

    fn step(&mut self, u: &mut Unstructured<'_>) -> Result<bool> {
        let rel = u.int_in_range(1..=3u32)?;
        Ok(match u.int_in_range(0..=15u8)? {
            0 => {
                let xid = u.int_in_range(1..=50u32)?;
                let ok = self.feed(encode::begin(Lsn(self.wal + (1 << 20)), 0, xid));
                if ok {
                    self.model.plain = Some(Txn::default());
                }
                ok
            }
            1 => {
                let name = if u.arbitrary()? { "skip" } else { "upstream" };
                let ok = self.feed(encode::origin(Lsn(7), name));
                let txn = match self.model.in_stream {
                    Some(top) => self.model.streams.get_mut(&top),
                    None => self.model.plain.as_mut(),
                };
                if let (true, Some(t)) = (ok, txn) {
                    // "any skipped one skips it" (several Origins may come)
                    t.skip |= name == "skip";
                }
                ok
            }
            2 => {
                let (xid, _) = self.target(u)?;
                let shape = SHAPES[u.choose_index(SHAPES.len())?];
                let identity = *u.choose(b"dfni")?;
                self.feed(encode::relation(xid, rel, "public", "t", identity, shape))
            }
            op @ 3..=5 => {
                let (xid, top) = self.target(u)?;
                let tag = self.tag();
                let t = tag.to_string();
                let second = *u.choose(&[Val::Text("x"), Val::Null, Val::Unchanged])?;
                let row = [Val::Text(&t), second];
                let msg = match op {
                    3 => encode::insert(xid, rel, &row),
                    4 => {
                        let old = if u.arbitrary()? {
                            Some((OldKind::Key, &[Val::Text("0"), Val::Null][..]))
                        } else {
                            None
                        };
                        encode::update(xid, rel, old, &row)
                    }
                    _ => encode::delete(xid, rel, OldKind::Key, &[Val::Text(&t), Val::Null]),
                };
                let ok = self.feed(msg);
                if ok {
                    self.record(top, xid, tag);
                }
                ok
            }
            6 => {
                let (xid, _) = self.target(u)?;
                let rels: Vec<u32> = (1..=rel).collect();
                self.feed(encode::truncate(xid, u.int_in_range(0..=3)?, &rels))
            }
            7 => {
                let commit_lsn = Lsn(self.wal + (1 << 20));
                let ok = self.feed(encode::commit(commit_lsn, Lsn(commit_lsn.0 + 8), 0));
                if ok {
                    self.wal = commit_lsn.0 + 8;
                    if let Some(txn) = self.model.plain.take() {
                        self.finish(txn);
                    }
                }
                ok
            }
            8 => {
                let xid = u.int_in_range(100..=102u32)?;
                let ok = self.feed(encode::stream_start(xid, u.arbitrary()?));
                if ok {
                    self.model.in_stream = Some(xid);
                    self.model.streams.entry(xid).or_default();
                }
                ok
            }
            9 => {
                let ok = self.feed(encode::stream_stop());
                if ok {
                    self.model.in_stream = None;
                }
                ok
            }
            10 => {
                let xid = u.int_in_range(100..=102u32)?;
                let commit_lsn = Lsn(self.wal + 16);
                let msg = encode::stream_commit(xid, commit_lsn, Lsn(commit_lsn.0 + 8), 0);
                let ok = self.feed(msg);
                if ok {
                    self.wal = commit_lsn.0 + 8;
                    if let Some(txn) = self.model.streams.remove(&xid) {
                        self.finish(txn);
                    }
                }
                ok
            }
            11 => {
                let xid = u.int_in_range(100..=102u32)?;
                let sub = if u.arbitrary()? { xid } else { xid + 1000 };
                let ok = self.feed(encode::stream_abort(xid, sub));
                if ok {
                    if sub == xid {
                        if let Some(txn) = self.model.streams.remove(&xid) {
                            self.model.aborted.extend(txn.tags.iter().map(|(t, _)| *t));
                        }
                    } else if let Some(txn) = self.model.streams.get_mut(&xid) {
                        txn.aborted_subs.insert(sub);
                        let (gone, kept) = txn.tags.iter().partition(|(_, x)| *x == sub);
                        txn.tags = kept;
                        let gone: Vec<(u64, u32)> = gone;
                        self.model.aborted.extend(gone.into_iter().map(|(t, _)| t));
                    }
                }
                ok
            }
            12 => {
                let (xid, _) = self.target(u)?;
                let content: &[u8] = u.arbitrary()?;
                self.feed(encode::message(xid, u.arbitrary()?, Lsn(9), "p", content))
            }
            13 => {
                let (xid, _) = self.target(u)?;
                self.feed(encode::type_message(xid, 16384, "public", "mood"))
            }
            _ => {
                let len = u.int_in_range(0..=48usize)?;
                let raw = u.bytes(len)?.to_vec();
                let ok = self.feed(raw);
                if ok {
                    self.model.exact = false;
                }
                ok
            }
        })
    }

    fn check_model(&self) {
        if !self.model.exact {
            return;
        }
        for t in &self.model.committed {
            assert!(
                self.emitted.tags.contains(t),
                "committed change {t} never left"
            );
        }
        for t in self.model.aborted.iter().chain(&self.model.skipped) {
            assert!(
                !self.emitted.tags.contains(t),
                "change {t} of an aborted or skipped transaction left"
            );
        }
    }
}

/// `FUZZ_TRACE=1 target/fuzz/<triple>/release/assembler CRASH` prints each message and
/// the events it made.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fn spill_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dbmazz-fuzz-assembler-{}", std::process::id()))
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let spill_threshold = u.int_in_range(0..=512usize)?;
    let flush_size = u.int_in_range(1..=8usize)?;
    let flush_bytes = u.int_in_range(1..=4096usize)?;
    let Ok(assembler) = Assembler::new(&spill_dir(), spill_threshold) else {
        return Ok(());
    };
    let mut r = Run {
        assembler: assembler.with_skip_origins(vec!["skip".into()]),
        batcher: Batcher::new(flush_size, Duration::from_secs(3600), Resume::default())
            .with_flush_bytes(flush_bytes),
        batches: Vec::new(),
        emitted: Emitted::default(),
        model: Model {
            exact: true,
            ..Model::default()
        },
        wal: 0x1000,
        next_tag: 0,
    };
    for _ in 0..256 {
        if u.is_empty() || !r.step(u)? {
            break;
        }
        r.check_model();
    }
    r.check_model();
    if let Some(b) = r.batcher.flush() {
        r.batches.push(b);
    }
    // The batches hold exactly what left the assembler, in order.
    let mut positions = Vec::new();
    for (i, b) in r.batches.iter().enumerate() {
        assert_eq!(b.id, i as u64 + 1, "batch ids count up by one");
        assert!(!b.changes.is_empty(), "an empty batch");
        assert_eq!(Some(b.first), b.changes.first().map(|c| c.position));
        assert_eq!(Some(b.last), b.changes.last().map(|c| c.position));
        positions.extend(b.changes.iter().map(|c| c.position));
    }
    assert_eq!(
        positions, r.emitted.positions,
        "batches differ from the changes"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
