//! Run plugin logic natively, without wasm, a host or a database.
//!
//! On a native target the SDK's capability modules ([`crate::log`], [`crate::metrics`],
//! [`crate::kv`], [`crate::http`]) talk to this thread-local double instead of the host:
//! logs and metrics are recorded, `kv` is an in-memory map, and HTTP requests go to a
//! handler you install. Call your [`crate::Sink`] or [`crate::Transform`] methods directly
//! on hand-built batches:
//!
//! ```
//! use dbmazz_sdk::testing::{self, BatchBuilder};
//! use dbmazz_sdk::{Datum, Op};
//! let batch = BatchBuilder::new(7)
//!     .table(1, "public", "users", &[("id", 23, true), ("email", 25, false)])
//!     .change(Op::Insert, 1, None, Some(vec![Datum::Int(1), Datum::Text("a@b.c".into())]))
//!     .build();
//! testing::on_http(|req| Ok(dbmazz_sdk::http::Response { status: 200, ..Default::default() }));
//! assert_eq!(batch.changes.len(), 1);
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::http::{HttpError, Request, Response};
use crate::log::Level;
use crate::{Batch, Change, Column, Datum, Op, Relation};

type Handler = Box<dyn FnMut(&Request) -> Result<Response, HttpError>>;

/// A recorded log event: level, message, fields.
pub type LogEvent = (Level, String, Vec<(String, String)>);

#[derive(Default)]
struct State {
    logs: Vec<LogEvent>,
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    kv_denied: bool,
    http: Option<Handler>,
    requests: Vec<Request>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Forgets everything recorded on this thread.
pub fn reset() {
    STATE.with(|s| *s.borrow_mut() = State::default());
}

/// Installs the handler that answers [`crate::http::send`] on this thread.
pub fn on_http(handler: impl FnMut(&Request) -> Result<Response, HttpError> + 'static) {
    STATE.with(|s| s.borrow_mut().http = Some(Box::new(handler)));
}

/// Requests sent so far on this thread.
pub fn requests() -> Vec<Request> {
    STATE.with(|s| s.borrow().requests.clone())
}

/// Log events so far: (level, message, fields).
pub fn logs() -> Vec<LogEvent> {
    STATE.with(|s| s.borrow().logs.clone())
}

/// The value of a counter.
pub fn counter(name: &str) -> u64 {
    STATE.with(|s| s.borrow().counters.get(name).copied().unwrap_or(0))
}

/// Makes `kv` calls fail as they do when the capability is not granted.
pub fn deny_kv() {
    STATE.with(|s| s.borrow_mut().kv_denied = true);
}

pub(crate) fn record_log(level: Level, message: &str, fields: &[(String, String)]) {
    STATE.with(|s| {
        s.borrow_mut()
            .logs
            .push((level, message.to_string(), fields.to_vec()))
    });
}

pub(crate) fn record_counter(name: &str, delta: u64) {
    STATE.with(|s| *s.borrow_mut().counters.entry(name.to_string()).or_default() += delta);
}

pub(crate) fn record_gauge(name: &str, value: f64) {
    STATE.with(|s| {
        s.borrow_mut().gauges.insert(name.to_string(), value);
    });
}

fn kv<T>(f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>) -> T) -> Result<T, String> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.kv_denied {
            return Err("capability kv is not granted to this plugin".into());
        }
        Ok(f(&mut s.kv))
    })
}

pub(crate) fn kv_get(key: &[u8]) -> Result<Option<Vec<u8>>, String> {
    kv(|m| m.get(key).cloned())
}

pub(crate) fn kv_set(key: &[u8], value: &[u8]) -> Result<(), String> {
    kv(|m| {
        m.insert(key.to_vec(), value.to_vec());
    })
}

pub(crate) fn kv_delete(key: &[u8]) -> Result<(), String> {
    kv(|m| {
        m.remove(key);
    })
}

pub(crate) fn http_send(req: &Request) -> Result<Response, HttpError> {
    let handler = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.requests.push(req.clone());
        s.http.take()
    });
    let Some(mut handler) = handler else {
        return Err(HttpError::Denied(format!(
            "{}: no handler installed (testing::on_http)",
            req.url
        )));
    };
    let r = handler(req);
    STATE.with(|s| s.borrow_mut().http = Some(handler));
    r
}

/// Builds batches by hand.
#[derive(Clone, Debug, Default)]
pub struct BatchBuilder {
    batch: Batch,
}

// The generated type cannot take a derive of its own.
#[allow(clippy::derivable_impls)]
impl Default for Batch {
    fn default() -> Self {
        Batch {
            id: 0,
            first_lsn: 0,
            last_lsn: 0,
            relations: Vec::new(),
            changes: Vec::new(),
        }
    }
}

impl BatchBuilder {
    /// An empty batch with this id.
    pub fn new(id: u64) -> Self {
        BatchBuilder {
            batch: Batch {
                id,
                ..Batch::default()
            },
        }
    }

    /// Adds a relation; columns are (name, type OID, key).
    pub fn table(
        mut self,
        id: u32,
        schema: &str,
        table: &str,
        columns: &[(&str, u32, bool)],
    ) -> Self {
        self.batch.relations.push(Relation {
            id,
            schema: schema.into(),
            table: table.into(),
            columns: columns
                .iter()
                .map(|(n, oid, key)| Column {
                    name: (*n).into(),
                    type_oid: *oid,
                    type_modifier: -1,
                    key: *key,
                })
                .collect(),
        });
        self
    }

    /// Adds a change to relation `relation`; LSNs count up from 1.
    pub fn change(
        mut self,
        op: Op,
        relation: u32,
        old: Option<Vec<Datum>>,
        new: Option<Vec<Datum>>,
    ) -> Self {
        let n = self.batch.changes.len() as u64 + 1;
        self.batch.changes.push(Change {
            op,
            relation,
            lsn: n,
            commit_lsn: n,
            xid: 1,
            commit_time_us: 1_700_000_000_000_000,
            old,
            old_is_key: false,
            new,
        });
        self
    }

    /// The batch.
    pub fn build(mut self) -> Batch {
        self.batch.first_lsn = self.batch.changes.first().map_or(0, |c| c.commit_lsn);
        self.batch.last_lsn = self.batch.changes.last().map_or(0, |c| c.commit_lsn);
        self.batch
    }
}
