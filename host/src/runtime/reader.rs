//! The reading side of one stream session: replication frames in, batches out.
//!
//! The reader task parses, assembles and batches (one task: no channel hop per message).
//! When the channel to delivery is full it stops reading, so a slow sink slows the
//! walsender through TCP instead of growing memory, while standby status updates keep
//! flowing so the server does not time the connection out.
//!
//! A session ends with an error when the connection is lost; the supervisor
//! ([`super::session`]) decides whether to reconnect. Silence from the server longer
//! than `source.receive_timeout_ms` counts as a lost connection (like PostgreSQL's
//! `wal_receiver_timeout`): halfway through, a status update asks the server for a
//! reply, so an idle but healthy server answers with a keepalive.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval};
use tracing::{debug, warn};

use super::RunError;
use crate::delivery::Delivery;
use crate::lsn::Lsn;
use crate::pipeline::assembler::{Assembler, Event, Step};
use crate::pipeline::batcher::Batcher;
use crate::snapshot::reconcile::{Reconciler, TxnInfo};
use crate::source::replication::{Frame, ReplicationReader, ReplicationWriter};
use crate::source::SourceError;
use crate::stats::{Stage, Stats};

/// One session's reader (see the module docs).
pub(super) struct Reader {
    pub(super) reader: ReplicationReader,
    pub(super) writer: ReplicationWriter,
    pub(super) assembler: Assembler,
    pub(super) batcher: Batcher,
    /// `pipeline.flush_when_caught_up`.
    pub(super) flush_when_caught_up: bool,
    /// Batches handed to delivery since the process started, counted once sent
    /// (compared with `stats.batches_delivered`, the batches the sink acknowledged, to
    /// tell when delivery is idle; carried from session to session).
    pub(super) handed_batches: u64,
    /// Id of the last batch handed to delivery (0: none yet).
    pub(super) last_handed_id: u64,
    pub(super) tx: mpsc::Sender<Delivery>,
    pub(super) confirmed_rx: watch::Receiver<Lsn>,
    pub(super) status_tick: Interval,
    pub(super) received: Lsn,
    /// The send time of the XLogData frame being handled, µs since the Unix epoch (the
    /// server's clock).
    pub(super) frame_sent_us: i64,
    /// The confirmed LSN the last standby status update carried.
    pub(super) reported: Lsn,
    pub(super) events: Vec<Event>,
    pub(super) stats: Arc<Stats>,
    pub(super) watermark_every: Duration,
    pub(super) last_watermark: Instant,
    pub(super) shutdown: watch::Receiver<bool>,
    /// True: no frames are read (the control API's Pause); status updates go on.
    pub(super) paused: watch::Receiver<bool>,
    /// Watermark snapshot windows (chunks copied while streaming).
    pub(super) reconciler: Reconciler,
    /// The transaction being read (for `read` changes emitted inside it).
    pub(super) txn: TxnInfo,
    /// `source.receive_timeout_ms`.
    pub(super) receive_timeout: Duration,
    /// When the server was last heard from (or reading last resumed after a pause or
    /// backpressure, which stop reading, not the server).
    pub(super) last_heard: Instant,
    /// A status update asking for a reply was sent since `last_heard`.
    pub(super) pinged: bool,
    /// host:port, for the timeout's message.
    pub(super) addr: String,
    /// `--record FILE`: every pgoutput message is appended (flushed at each status
    /// tick); dropped, with a warning, when a write fails.
    pub(super) recorder: Option<crate::source::recording::Recorder>,
}

impl Reader {
    /// A standby status update with the confirmed LSN; `reply` asks the server to answer
    /// (with a keepalive) at once.
    async fn send_status(&mut self, reply: bool) -> Result<(), SourceError> {
        let confirmed = *self.confirmed_rx.borrow_and_update();
        self.stats
            .confirmed_lsn
            .store(confirmed.0, Ordering::Relaxed);
        self.writer
            .send_status(self.received.max(confirmed), confirmed, reply)
            .await?;
        if confirmed > self.reported {
            self.reported = confirmed;
            self.stats.confirm_reported();
        }
        Ok(())
    }

    /// Hands an item to delivery, waiting for room (backpressure) while keeping the
    /// replication connection alive.
    ///
    /// Cancel-safe as the supervisor needs it: a batch counts as handed only once sent.
    async fn hand(&mut self, item: Delivery) -> Result<(), RunError> {
        let batch_id = match &item {
            Delivery::Batch(b) => {
                debug!(batch = b.id, first = %b.first, last = %b.last, changes = b.changes.len(), watermark = ?b.watermark, replayed = b.replayed, "handing batch");
                Some(b.id)
            }
            _ => None,
        };
        let tx = self.tx.clone();
        let mut waited = false;
        loop {
            let wake = tokio::select! {
                biased;
                permit = tx.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(item);
                        if let Some(id) = batch_id {
                            self.handed_batches += 1;
                            self.last_handed_id = id;
                        }
                        if waited {
                            // reading stopped for backpressure, not for the server
                            self.heard();
                        }
                        return Ok(());
                    }
                    // delivery ended; `run` reports its error
                    Err(_) => return Err(RunError::Interrupted),
                },
                _ = self.shutdown.changed() => return Err(RunError::Interrupted),
                r = self.confirmed_rx.changed() => r.is_ok(),
                _ = self.status_tick.tick() => true,
            };
            if !wake {
                return Err(RunError::Interrupted);
            }
            waited = true;
            self.send_status(false).await?;
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.pinged = false;
    }

    async fn drain_events(&mut self) -> Result<(), RunError> {
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            let mut emitted = None;
            match &ev {
                Event::Begin {
                    xid,
                    commit_time_us,
                    ..
                } => {
                    self.txn = TxnInfo {
                        xid: *xid,
                        commit_time_us: *commit_time_us,
                    }
                }
                Event::Commit { commit_lsn, .. } => {
                    let (commit, sent) = (self.txn.commit_time_us, self.frame_sent_us);
                    let us = |from: i64, to: i64| to.saturating_sub(from).max(0) as u64;
                    let server = us(commit, sent);
                    self.stats
                        .record_stage(Stage::Server, Duration::from_micros(server));
                    self.stats.record_stage(
                        Stage::Receive,
                        Duration::from_micros(us(sent, crate::metrics::now_us())),
                    );
                    if let Ok(mut c) = self.stats.commit_to_ack.lock() {
                        c.server_share(*commit_lsn, server);
                    }
                }
                Event::Change(c) if self.reconciler.active() => {
                    self.reconciler.on_change(c, self.txn)
                }
                Event::Message { position, message } => {
                    emitted = self.reconciler.on_message(message, *position, self.txn);
                }
                _ => {}
            }
            self.push(ev).await?;
            if let Some(e) = emitted {
                // A high watermark: the chunk's rows go in here, inside its transaction.
                let n = e.reads.len() as u64;
                let last = e.reads.last().map(|c| c.position);
                for c in e.reads {
                    self.push(Event::Change(c)).await?;
                }
                self.hand(Delivery::ChunkRead {
                    chunk: e.chunk,
                    last,
                })
                .await?;
                if let Some(tx) = e.consumed {
                    let _ = tx.send((n, last));
                }
            }
        }
        self.events = events;
        Ok(())
    }

    async fn push(&mut self, ev: Event) -> Result<(), RunError> {
        if let Some(batch) = self.batcher.push(ev) {
            self.hand(Delivery::Batch(batch)).await?;
        }
        while let Some(batch) = self.batcher.next_ready() {
            self.hand(Delivery::Batch(batch)).await?;
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), RunError> {
        self.heard();
        match frame {
            Frame::XLogData {
                wal_start,
                wal_end,
                send_time_us,
                data,
            } => {
                self.frame_sent_us = send_time_us;
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                self.stats
                    .bytes_received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
                self.received = self.received.max(wal_start);
                self.stats
                    .received_lsn
                    .store(self.received.0, Ordering::Relaxed);
                if let Some(rec) = &mut self.recorder {
                    if let Err(e) = rec.record(wal_start, &data) {
                        warn!(file = %rec.path().display(), error = %e, "recording stopped");
                        self.recorder = None;
                    }
                }
                let step = self.assembler.handle(wal_start, data, &mut self.events)?;
                self.drain_events().await?;
                if let Step::Replay(mut txn) = step {
                    debug!(
                        xid = txn.xid(),
                        spilled = txn.spilled(),
                        "replaying streamed transaction"
                    );
                    while self.assembler.replay(&mut txn, &mut self.events)? {
                        self.drain_events().await?;
                    }
                }
            }
            Frame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                if self.assembler.is_idle() {
                    self.received = self.received.max(wal_end);
                    self.batcher.idle_position(wal_end);
                }
                if reply_requested {
                    self.send_status(false).await?;
                }
            }
            Frame::End => return Err(RunError::StreamEnded),
        }
        // a long frame (a streamed transaction's replay) is not the server's silence
        self.heard();
        Ok(())
    }

    /// Reads until shutdown (`Ok`) or an error: a lost connection
    /// ([`RunError::is_connection_lost`]) ends the session, anything else the pipeline.
    pub(super) async fn stream(&mut self) -> Result<(), RunError> {
        self.heard();
        loop {
            let batch_deadline = self.batcher.deadline();
            let watermark_due = (!self.batcher.has_open() && self.batcher.has_pending_watermark())
                .then(|| self.last_watermark + self.watermark_every);
            let far = Instant::now() + Duration::from_secs(3600);
            let paused = *self.paused.borrow_and_update();
            if paused {
                // not reading: silence is ours, not the server's
                self.heard();
            }
            let silence_due = self.last_heard
                + if self.pinged {
                    self.receive_timeout
                } else {
                    self.receive_timeout / 2
                };
            // Nothing more to read right now (the frame branch below was not ready), the
            // sink has acknowledged every batch handed on, and the open batch ends at a
            // commit: hand it on now (see `Batcher::cut_at_commit`). While the sink works,
            // the open batch keeps filling (group commit: with a fast sink and a backlog,
            // cutting whenever the queue was empty made batches of ~30 changes).
            // (The clock is read last: this runs once per frame.)
            let cut_now = self.flush_when_caught_up
                && self.batcher.has_open()
                && self.stats.batches_delivered.load(Ordering::Relaxed) >= self.handed_batches
                && self.batcher.can_cut_at_commit(crate::metrics::now_us());
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.changed() => return Ok(()),
                r = self.paused.changed() => match r {
                    Ok(()) => Wake::Status,
                    Err(_) => return Err(RunError::Interrupted),
                },
                r = self.confirmed_rx.changed() => match r {
                    Ok(()) => Wake::Status,
                    Err(_) => return Err(RunError::Interrupted),
                },
                _ = self.status_tick.tick() => Wake::Status,
                _ = tokio::time::sleep_until(silence_due), if !paused => Wake::Silence,
                _ = tokio::time::sleep_until(batch_deadline.map_or(far, Instant::from_std)), if batch_deadline.is_some() => Wake::BatchDue,
                _ = tokio::time::sleep_until(watermark_due.unwrap_or(far)), if watermark_due.is_some() => Wake::WatermarkDue,
                frame = self.reader.next(), if !paused => Wake::Frame(frame?),
                () = std::future::ready(()), if cut_now => Wake::CaughtUp,
            };
            match wake {
                Wake::Status => {
                    if let Some(rec) = &mut self.recorder {
                        if let Err(e) = rec.flush() {
                            warn!(file = %rec.path().display(), error = %e, "recording stopped");
                            self.recorder = None;
                        }
                    }
                    self.send_status(false).await?
                }
                Wake::Silence if !self.pinged => {
                    // Halfway: ask for a reply (a keepalive) before giving up.
                    self.send_status(true).await?;
                    self.pinged = true;
                }
                Wake::Silence => {
                    return Err(SourceError::Timeout {
                        what: "receiving",
                        addr: self.addr.clone(),
                        after_ms: self.receive_timeout.as_millis() as u64,
                    }
                    .into())
                }
                Wake::BatchDue => {
                    if let Some(batch) = self.batcher.tick(std::time::Instant::now()) {
                        self.hand(Delivery::Batch(batch)).await?;
                    }
                }
                Wake::WatermarkDue => {
                    if let Some(w) = self.batcher.take_watermark() {
                        self.last_watermark = Instant::now();
                        self.hand(Delivery::Watermark(w)).await?;
                    }
                }
                Wake::Frame(frame) => self.on_frame(frame).await?,
                Wake::CaughtUp => {
                    if let Some(batch) = self.batcher.cut_at_commit(crate::metrics::now_us()) {
                        self.hand(Delivery::Batch(batch)).await?;
                    }
                }
            }
        }
    }
}

enum Wake {
    Status,
    /// Nothing heard from the server for half (then all) of the receive timeout.
    Silence,
    BatchDue,
    WatermarkDue,
    Frame(Frame),
    /// Caught up with the server while delivery is idle.
    CaughtUp,
}
