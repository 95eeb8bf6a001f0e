//! `sink-webhook`: POSTs each batch to a URL as CloudEvents 1.0 in batched mode.
//!
//! Request: `POST <url>`, `Content-Type: application/cloudevents-batch+json`, body a JSON
//! array with one event per change (CloudEvents spec, "JSON Event Format", batched mode):
//!
//! ```json
//! [{"specversion":"1.0","id":"42:0","source":"/dbmazz/shop/dbmazz_slot",
//!   "type":"io.dbmazz.change.insert","time":"2024-01-02T03:04:05.123456Z",
//!   "subject":"public.orders","datacontenttype":"application/json",
//!   "data":{"before":null,"after":{"id":1,"status":"new"},"op":"c",
//!           "source":{"lsn":23456,"txId":741,"schema":"public","table":"orders","ts_ms":1704164645123}}}]
//! ```
//!
//! `id` is `<pipeline id>-<batch id>:<index in batch>`: stable across replays, so
//! receivers can deduplicate; the pipeline id (`dbmazz.pipeline_id`, 16 hex digits drawn
//! when the state directory was created) changes when a pipeline starts over with a new
//! `state.dir`, whose batch ids start at 1 again (without it: `<batch id>:<index>`). `data` is the Debezium envelope (`op` c/u/d/t, and r for a row copied by
//! the snapshot, type `io.dbmazz.change.read`); an unchanged TOAST column
//! appears as `"__debezium_unavailable_value"` in `after`, as Debezium writes it.
//! Values: integers, floats and booleans as JSON scalars; numeric and text as strings;
//! json/jsonb nested; bytea base64.
//!
//! Headers: `Idempotency-Key: <pipeline id>-<batch id>`; with `secret`, `X-Dbmazz-Signature:
//! sha256=<hex HMAC-SHA256 of the body bytes as sent>`; with `gzip = true`,
//! `Content-Encoding: gzip`.
//!
//! Outcome: 2xx acknowledges the batch; 408, 429, 5xx, timeouts and connection errors are
//! retried by the host with backoff (honouring `Retry-After` in seconds); any other 4xx
//! sends the batch's changes to the dead-letter store with the status and response body
//! as the reason; a URL not on the plugin's HTTP allow-list, or a 3xx redirect (never
//! followed), stops the pipeline.
//!
//! Config: `url` (required), `secret`, `gzip` (bool, default false), `timeout_ms`
//! (default 10000), `source` (default `/dbmazz/<database>/<slot>`).

use std::io::Write;

use dbmazz_sdk::encoded::{RawValue, TupleView};
use dbmazz_sdk::http::{self, HttpError, Request};
use dbmazz_sdk::{
    export_sink, Batch, Config, ConfigType, Datum, EncodedBatch, Metadata, Op, Relation, Sink,
    SinkError, SinkInfo,
};
use hmac::{Hmac, Mac};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use sha2::Sha256;

/// Debezium's placeholder for a value that was not sent.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

struct DatumJson<'a>(&'a Datum);

impl Serialize for DatumJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Datum::Null => s.serialize_unit(),
            Datum::UnchangedToast => s.serialize_str(UNAVAILABLE),
            Datum::Boolean(b) => s.serialize_bool(*b),
            Datum::Int(i) => s.serialize_i64(*i),
            Datum::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Datum::Float(f) => s.serialize_str(if f.is_nan() {
                "NaN"
            } else if *f > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            }),
            Datum::Numeric(t) | Datum::Text(t) => s.serialize_str(t),
            Datum::Json(t) => match sonic_rs::from_str::<sonic_rs::LazyValue<'_>>(t) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(t),
            },
            Datum::Bytes(b) => s.serialize_str(&base64(b)),
        }
    }
}

/// A raw value of a column of type `oid`, as JSON, without allocating (except bytea).
struct RawJson<'a>(u32, RawValue<'a>);

impl Serialize for RawJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = match self.1 {
            RawValue::Null => return s.serialize_unit(),
            RawValue::UnchangedToast => return s.serialize_str(UNAVAILABLE),
            RawValue::Binary(b) => return s.serialize_str(&base64(b)),
            RawValue::Text(t) => t,
        };
        match self.0 {
            16 => s.serialize_bool(t == "t"),
            20 | 21 | 23 | 26 => match t.parse::<i64>() {
                Ok(i) => s.serialize_i64(i),
                Err(_) => s.serialize_str(t),
            },
            700 | 701 => match t.parse::<f64>() {
                Ok(f) if f.is_finite() => s.serialize_f64(f),
                _ => s.serialize_str(t),
            },
            17 => match dbmazz_sdk::encoded::bytea(t) {
                Some(b) => s.serialize_str(&base64(&b)),
                None => s.serialize_str(t),
            },
            114 | 3802 => match sonic_rs::from_str::<sonic_rs::LazyValue<'_>>(t) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(t),
            },
            _ => s.serialize_str(t),
        }
    }
}

struct RawRowJson<'a> {
    relation: &'a Relation,
    values: TupleView<'a>,
}

impl Serialize for RawRowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (c, v) in self.relation.columns.iter().zip(self.values.iter()) {
            let v = v.map_err(serde::ser::Error::custom)?;
            m.serialize_entry(&c.name, &RawJson(c.type_oid, v))?;
        }
        m.end()
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum AnyRow<'a> {
    Typed(RowJson<'a>),
    Raw(RawRowJson<'a>),
}

struct RowJson<'a> {
    relation: &'a Relation,
    values: &'a [Datum],
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (c, v) in self.relation.columns.iter().zip(self.values) {
            m.serialize_entry(&c.name, &DatumJson(v))?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct SourceInfo<'a> {
    lsn: u64,
    #[serde(rename = "txId")]
    tx_id: u32,
    schema: &'a str,
    table: &'a str,
    ts_ms: i64,
}

#[derive(Serialize)]
struct Envelope<'a> {
    before: Option<AnyRow<'a>>,
    after: Option<AnyRow<'a>>,
    op: &'static str,
    source: SourceInfo<'a>,
}

#[derive(Serialize)]
struct Event<'a> {
    specversion: &'static str,
    id: String,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    time: String,
    subject: String,
    datacontenttype: &'static str,
    data: Envelope<'a>,
}

pub use dbmazz_sdk::time::rfc3339;

/// Standard base64 with padding.
pub fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Events sampled before the body is sized for the rest.
const SIZING_SAMPLE: usize = 32;

/// The most the sample may reserve at once, bytes.
const SIZING_CAP: usize = 16 << 20;

/// `count` events as one JSON array, each serialized straight into the body as it is made
/// (no list of events held). The body is sized once: after the first [`SIZING_SAMPLE`]
/// events it reserves their average size for the rest (plus an eighth, up to
/// [`SIZING_CAP`]), so a batch of even-sized changes is never copied by growth — a growing
/// buffer's copy briefly holds the body twice, and the sink's memory keeps that mark.
fn json_array<'a>(
    count: usize,
    events: impl Iterator<Item = Result<Event<'a>, SinkError>>,
) -> Result<Vec<u8>, SinkError> {
    let mut out = Vec::with_capacity(4096);
    out.push(b'[');
    for (i, event) in events.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if i == SIZING_SAMPLE {
            let rest = count.saturating_sub(i);
            let estimate = (out.len() / i).saturating_mul(rest).saturating_mul(9) / 8;
            // Only a hint: a sample of a few large rows must not claim memory the rest
            // will not use (a plugin's memory never shrinks, and a grow past
            // `limits.memory_mb` traps); past the cap the buffer grows as it needs.
            let _ = out.try_reserve(estimate.min(SIZING_CAP));
        }
        sonic_rs::to_writer(&mut out, &event?)
            .map_err(|e| SinkError::Fatal(format!("encoding JSON: {e}")))?;
    }
    out.push(b']');
    Ok(out)
}

fn unknown_relation(i: usize, relation: u32) -> SinkError {
    SinkError::Fatal(format!("change {i} refers to unknown relation {relation}"))
}

fn op_letter(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Truncate => "t",
        Op::Read => "r",
    }
}

/// The webhook sink.
#[derive(Debug)]
pub struct Webhook {
    url: String,
    secret: Option<String>,
    gzip: bool,
    timeout_ms: u64,
    source: String,
    /// `<dbmazz.pipeline_id>-` (the state directory's incarnation), or empty: keeps
    /// ids and idempotency keys apart when a pipeline starts over with new batch ids.
    key_prefix: String,
}

impl Webhook {
    /// One event: change `i` of batch `batch_id`, with its rows already wrapped.
    #[allow(clippy::too_many_arguments)]
    fn event<'a>(
        &'a self,
        batch_id: u64,
        i: usize,
        op: Op,
        rel: &'a Relation,
        lsn: u64,
        xid: u32,
        commit_time_us: i64,
        before: Option<AnyRow<'a>>,
        after: Option<AnyRow<'a>>,
    ) -> Event<'a> {
        Event {
            specversion: "1.0",
            id: format!("{}{batch_id}:{i}", self.key_prefix),
            source: &self.source,
            kind: format!("io.dbmazz.change.{}", op.as_str()),
            time: rfc3339(commit_time_us),
            subject: rel.qualified_name(),
            datacontenttype: "application/json",
            data: Envelope {
                before,
                after,
                op: op_letter(op),
                source: SourceInfo {
                    lsn,
                    tx_id: xid,
                    schema: &rel.schema,
                    table: &rel.table,
                    ts_ms: commit_time_us.div_euclid(1000),
                },
            },
        }
    }

    /// The request body: the CloudEvents batch (uncompressed).
    pub fn body(&self, batch: &Batch) -> Result<Vec<u8>, SinkError> {
        let events = batch.changes.iter().enumerate().map(|(i, c)| {
            let rel = batch
                .relation_of(c)
                .ok_or_else(|| unknown_relation(i, c.relation))?;
            let row = |values| {
                AnyRow::Typed(RowJson {
                    relation: rel,
                    values,
                })
            };
            Ok(self.event(
                batch.id,
                i,
                c.op,
                rel,
                c.lsn,
                c.xid,
                c.commit_time_us,
                c.old.as_deref().map(row),
                c.new.as_deref().map(row),
            ))
        });
        json_array(batch.changes.len(), events)
    }

    /// The request body of an encoded batch: the same events as [`Webhook::body`].
    pub fn body_encoded(&self, batch: &EncodedBatch) -> Result<Vec<u8>, SinkError> {
        let events = batch.changes().enumerate().map(|(i, c)| {
            let c = c.map_err(|e| SinkError::Fatal(e.to_string()))?;
            let rel = batch
                .relation(c.relation)
                .ok_or_else(|| unknown_relation(i, c.relation))?;
            let row = |values| {
                AnyRow::Raw(RawRowJson {
                    relation: rel,
                    values,
                })
            };
            Ok(self.event(
                batch.id,
                i,
                c.op,
                rel,
                c.lsn,
                c.xid,
                c.commit_time_us,
                c.old.map(row),
                c.new.map(row),
            ))
        });
        json_array(batch.count as usize, events)
    }

    /// The full request for a batch (body compressed and signed as configured).
    pub fn request(&self, batch: &Batch) -> Result<Request, SinkError> {
        let body = self.body(batch)?;
        self.request_for(batch.id, body)
    }

    fn request_for(&self, batch_id: u64, mut body: Vec<u8>) -> Result<Request, SinkError> {
        let mut req = Request::post(&self.url, Vec::new())
            .header("content-type", "application/cloudevents-batch+json")
            .header("idempotency-key", format!("{}{batch_id}", self.key_prefix))
            .timeout_ms(self.timeout_ms);
        if self.gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            enc.write_all(&body)
                .and_then(|()| enc.finish())
                .map(|b| body = b)
                .map_err(|e| SinkError::Fatal(format!("gzip: {e}")))?;
            req = req.header("content-encoding", "gzip");
        }
        if let Some(secret) = &self.secret {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|e| SinkError::Fatal(e.to_string()))?;
            mac.update(&body);
            let sig: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            req = req.header("x-dbmazz-signature", format!("sha256={sig}"));
        }
        req.body = body;
        Ok(req)
    }
}

impl Sink for Webhook {
    fn metadata() -> Metadata {
        use ConfigType::{Boolean, Integer, Text};
        Metadata::keys()
            .required(
                "url",
                Text,
                "where batches are POSTed (http(s)://host:port/path)",
            )
            .key(
                "source",
                Text,
                None,
                "the CloudEvents source (default /dbmazz/<database>/<slot>)",
            )
            .key(
                "secret",
                Text,
                None,
                "HMAC-SHA256 key for the X-Dbmazz-Signature header",
            )
            .key("gzip", Boolean, Some("false"), "gzip request bodies")
            .key("timeout_ms", Integer, Some("10000"), "per request, ms")
    }

    fn init(config: &Config) -> Result<(Self, SinkInfo), String> {
        let url = config.required("url")?.to_string();
        http::split_url(&url).map_err(|e| format!("config key \"url\": {e}"))?;
        let source = match config.get("source") {
            Some(s) => s.to_string(),
            None => format!(
                "/dbmazz/{}/{}",
                config.get("dbmazz.database").unwrap_or("db"),
                config.get("dbmazz.slot").unwrap_or("slot")
            ),
        };
        let w = Webhook {
            url,
            secret: config.get("secret").map(str::to_string),
            gzip: config.parse_or("gzip", false)?,
            timeout_ms: config.parse_or("timeout_ms", 10_000)?,
            source,
            key_prefix: config
                .get("dbmazz.pipeline_id")
                .map_or(String::new(), |p| format!("{p}-")),
        };
        Ok((w, SinkInfo::default()))
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.changes.is_empty() {
            return Ok(());
        }
        let req = self.request(batch)?;
        self.send(req, batch.id, batch.changes.len())
    }

    fn write_encoded(&mut self, batch: &EncodedBatch) -> Result<(), SinkError> {
        if batch.count == 0 {
            return Ok(());
        }
        let req = self.request_for(batch.id, self.body_encoded(batch)?)?;
        self.send(req, batch.id, batch.count as usize)
    }
}

impl Webhook {
    /// Sends a batch's request and turns the response into an acknowledgement or an error.
    fn send(&self, req: Request, batch_id: u64, changes: usize) -> Result<(), SinkError> {
        let resp = match http::send(&req) {
            Ok(r) => r,
            Err(HttpError::Denied(m)) => return Err(SinkError::Fatal(m)),
            Err(HttpError::InvalidUrl(m)) => return Err(SinkError::Fatal(m)),
            Err(e) => return Err(SinkError::retryable(e.to_string())),
        };
        dbmazz_sdk::metrics::counter_add("requests", 1);
        match resp.status {
            200..=299 => {
                dbmazz_sdk::metrics::counter_add("events", changes as u64);
                Ok(())
            }
            // wasi:http never follows a redirect, and following it here would send the
            // batch to a target the operator did not name: a configuration error
            300..=399 => Err(SinkError::Fatal(format!(
                "HTTP {} from {}: the receiver redirects to {}; redirects are not followed, set `url` to the target (and put it on the allow-list)",
                resp.status,
                self.url,
                resp.header("location").unwrap_or("(no Location header)")
            ))),
            408 | 429 | 500..=599 => Err(SinkError::Retryable {
                message: format!("HTTP {} from {}", resp.status, self.url),
                retry_after_ms: resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .map(|s| s.saturating_mul(1000)),
            }),
            status => {
                let text =
                    String::from_utf8_lossy(&resp.body[..resp.body.len().min(500)]).into_owned();
                let reason = format!("HTTP {status} from {}: {text}", self.url);
                dbmazz_sdk::warn!(
                    "webhook refused the batch",
                    batch = batch_id,
                    status = status
                );
                Err(SinkError::DeadLetter(
                    (0..changes as u32).map(|i| (i, reason.clone())).collect(),
                ))
            }
        }
    }
}

export_sink!(Webhook);

#[cfg(test)]
mod tests {
    use super::*;
    use dbmazz_sdk::http::Response;
    use dbmazz_sdk::testing::{self, BatchBuilder};

    fn sink(extra: &[(&str, &str)]) -> Webhook {
        let mut kv = vec![("url".to_string(), "http://127.0.0.1:9/hook".to_string())];
        kv.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Webhook::init(&Config::new(kv)).unwrap().0
    }

    fn batch() -> Batch {
        BatchBuilder::new(42)
            .table(
                7,
                "public",
                "orders",
                &[
                    ("id", 23, true),
                    ("note", 25, false),
                    ("doc", 3802, false),
                    ("raw", 17, false),
                ],
            )
            .change(
                Op::Insert,
                7,
                None,
                Some(vec![
                    Datum::Int(1),
                    Datum::Text("hi \"there\"".into()),
                    Datum::Json("{\"a\": [1]}".into()),
                    Datum::Bytes(vec![0, 255]),
                ]),
            )
            .change(
                Op::Update,
                7,
                None,
                Some(vec![
                    Datum::Int(1),
                    Datum::UnchangedToast,
                    Datum::Null,
                    Datum::Null,
                ]),
            )
            .build()
    }

    #[test]
    fn a_body_past_the_sizing_sample_is_the_same_json_array() {
        use sonic_rs::JsonValueTrait;
        // 100 events: the body is sized after the first 32, and must not change shape.
        let mut b = BatchBuilder::new(9).table(7, "public", "t", &[("id", 23, true)]);
        for i in 0..100 {
            b = b.change(Op::Insert, 7, None, Some(vec![Datum::Int(i)]));
        }
        let body = sink(&[]).body(&b.build()).unwrap();
        let v: Vec<sonic_rs::Value> = sonic_rs::from_slice(&body).unwrap();
        assert_eq!(v.len(), 100);
        let ids: Vec<String> = v
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids[0], "9:0");
        assert_eq!(ids[99], "9:99");
        assert_eq!(v[99]["data"]["after"]["id"].as_i64(), Some(99));
        assert_eq!(body, sonic_rs::to_vec(&v).unwrap(), "compact, no spaces");
    }

    #[test]
    fn cloudevents_body() {
        let body = String::from_utf8(sink(&[]).body(&batch()).unwrap()).unwrap();
        let v: sonic_rs::Value = sonic_rs::from_str(&body).unwrap();
        let expected: sonic_rs::Value = sonic_rs::from_str(r#"[
          {"specversion":"1.0","id":"42:0","source":"/dbmazz/db/slot","type":"io.dbmazz.change.insert",
           "time":"2023-11-14T22:13:20.000000Z","subject":"public.orders","datacontenttype":"application/json",
           "data":{"before":null,"after":{"id":1,"note":"hi \"there\"","doc":{"a":[1]},"raw":"AP8="},"op":"c",
                   "source":{"lsn":1,"txId":1,"schema":"public","table":"orders","ts_ms":1700000000000}}},
          {"specversion":"1.0","id":"42:1","source":"/dbmazz/db/slot","type":"io.dbmazz.change.update",
           "time":"2023-11-14T22:13:20.000000Z","subject":"public.orders","datacontenttype":"application/json",
           "data":{"before":null,"after":{"id":1,"note":"__debezium_unavailable_value","doc":null,"raw":null},"op":"u",
                   "source":{"lsn":2,"txId":1,"schema":"public","table":"orders","ts_ms":1700000000000}}}]"#).unwrap();
        assert_eq!(v, expected);
    }

    #[test]
    fn snapshot_read_is_debezium_r() {
        let b = BatchBuilder::new(5)
            .table(7, "public", "orders", &[("id", 23, true)])
            .change(Op::Read, 7, None, Some(vec![Datum::Int(3)]))
            .build();
        let s = sink(&[]);
        let v: sonic_rs::Value = sonic_rs::from_slice(&s.body(&b).unwrap()).unwrap();
        let expected: sonic_rs::Value = sonic_rs::from_str(r#"[
          {"specversion":"1.0","id":"5:0","source":"/dbmazz/db/slot","type":"io.dbmazz.change.read",
           "time":"2023-11-14T22:13:20.000000Z","subject":"public.orders","datacontenttype":"application/json",
           "data":{"before":null,"after":{"id":3},"op":"r",
                   "source":{"lsn":1,"txId":1,"schema":"public","table":"orders","ts_ms":1700000000000}}}]"#).unwrap();
        assert_eq!(v, expected);
        let enc = dbmazz_sdk::encoded::encode_for_tests(&b);
        let e: sonic_rs::Value = sonic_rs::from_slice(&s.body_encoded(&enc).unwrap()).unwrap();
        assert_eq!(e, expected);
    }

    #[test]
    fn encoded_body_equals_typed_body() {
        let s = sink(&[]);
        let enc = dbmazz_sdk::encoded::encode_for_tests(&batch());
        let a: sonic_rs::Value = sonic_rs::from_slice(&s.body(&batch()).unwrap()).unwrap();
        let b: sonic_rs::Value = sonic_rs::from_slice(&s.body_encoded(&enc).unwrap()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn signature_and_outcomes() {
        testing::reset();
        let mut s = sink(&[("secret", "k")]);
        let statuses = std::rc::Rc::new(std::cell::RefCell::new(vec![200u16, 400, 307, 503]));
        let st = statuses.clone();
        testing::on_http(move |_req| {
            Ok(Response {
                status: st.borrow_mut().pop().unwrap(),
                headers: vec![
                    ("retry-after".into(), b"2".to_vec()),
                    ("location".into(), b"http://elsewhere:80/".to_vec()),
                ],
                body: b"nope".to_vec(),
            })
        });
        assert_eq!(
            s.write(&batch()),
            Err(SinkError::Retryable {
                message: "HTTP 503 from http://127.0.0.1:9/hook".into(),
                retry_after_ms: Some(2000)
            })
        );
        match s.write(&batch()) {
            Err(SinkError::Fatal(m)) => assert!(
                m.contains("HTTP 307") && m.contains("redirects to http://elsewhere:80/"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        match s.write(&batch()) {
            Err(SinkError::DeadLetter(l)) => {
                assert_eq!(l.len(), 2);
                assert!(l[0].1.contains("HTTP 400") && l[0].1.contains("nope"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.write(&batch()), Ok(()));
        let req = &testing::requests()[0];
        let sig = req
            .headers
            .iter()
            .find(|(k, _)| k == "x-dbmazz-signature")
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(&req.body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(String::from_utf8_lossy(&sig.1), format!("sha256={hex}"));
        assert!(req
            .headers
            .contains(&("idempotency-key".into(), b"42".to_vec())));
    }

    #[test]
    fn helpers() {
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
    }
}
