//! A template sink: for each batch, one text line per change (`insert public.orders
//! id=7`), POSTed to `url`. Shows the SDK's pieces: config, rows by column name,
//! logging, metrics, HTTP, and the three kinds of errors.

use dbmazz_sdk::http::{self, HttpError, Request};
use dbmazz_sdk::{
    export_sink, Batch, Config, ConfigType, Datum, Metadata, Row, Sink, SinkError, SinkInfo,
};

pub struct Lines {
    url: String,
    only_table: Option<String>,
}

fn show(d: &Datum) -> String {
    match d {
        Datum::Null => "null".into(),
        Datum::UnchangedToast => "(unchanged)".into(),
        Datum::Boolean(b) => b.to_string(),
        Datum::Int(i) => i.to_string(),
        Datum::Float(f) => f.to_string(),
        Datum::Numeric(s) | Datum::Text(s) | Datum::Json(s) => s.clone(),
        Datum::Bytes(b) => format!("{} bytes", b.len()),
    }
}

impl Lines {
    /// The request body for a batch.
    pub fn body(&self, batch: &Batch) -> String {
        let mut out = String::new();
        for c in &batch.changes {
            let Some(rel) = batch.relation_of(c) else {
                continue;
            };
            let table = rel.qualified_name();
            if self.only_table.as_ref().is_some_and(|t| *t != table) {
                continue;
            }
            let values = c.new.as_ref().or(c.old.as_ref());
            let keys: Vec<String> = values
                .map(|v| {
                    Row::new(rel, v)
                        .iter()
                        .zip(&rel.columns)
                        .filter(|(_, col)| col.key)
                        .map(|((name, d), _)| format!("{name}={}", show(d)))
                        .collect()
                })
                .unwrap_or_default();
            out.push_str(&format!("{} {table} {}\n", c.op.as_str(), keys.join(" ")));
        }
        out
    }
}

impl Sink for Lines {
    /// The keys this sink takes; the host refuses a stage that sets any other.
    fn metadata() -> Metadata {
        Metadata::keys()
            .required("url", ConfigType::Text, "where lines are POSTed")
            .key(
                "only_table",
                ConfigType::Text,
                None,
                "send only this table's changes",
            )
    }

    fn init(config: &Config) -> Result<(Self, SinkInfo), String> {
        Ok((
            Lines {
                url: config.required("url")?.to_string(),
                only_table: config.get("only_table").map(str::to_string),
            },
            SinkInfo::default(),
        ))
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let body = self.body(batch);
        if body.is_empty() {
            return Ok(());
        }
        let req = Request::post(&self.url, body.into_bytes())
            .header("content-type", "text/plain")
            .header("idempotency-key", batch.id.to_string())
            .timeout_ms(5_000);
        match http::send(&req) {
            Ok(r) if r.status < 300 => {
                dbmazz_sdk::metrics::counter_add("lines", batch.changes.len() as u64);
                Ok(())
            }
            Ok(r) if r.status >= 500 => Err(SinkError::retryable(format!("HTTP {}", r.status))),
            Ok(r) => Err(SinkError::DeadLetter(
                (0..batch.changes.len() as u32)
                    .map(|i| (i, format!("HTTP {}", r.status)))
                    .collect(),
            )),
            Err(HttpError::Denied(m)) => Err(SinkError::Fatal(m)),
            Err(e) => {
                dbmazz_sdk::warn!("request failed", batch = batch.id, error = e);
                Err(SinkError::retryable(e.to_string()))
            }
        }
    }
}

export_sink!(Lines);

#[cfg(test)]
mod tests {
    use super::*;
    use dbmazz_sdk::http::Response;
    use dbmazz_sdk::testing::{self, BatchBuilder};
    use dbmazz_sdk::Op;

    fn batch() -> Batch {
        BatchBuilder::new(3)
            .table(
                1,
                "public",
                "orders",
                &[("id", 23, true), ("note", 25, false)],
            )
            .table(2, "public", "other", &[("id", 23, true)])
            .change(
                Op::Insert,
                1,
                None,
                Some(vec![Datum::Int(7), Datum::Text("x".into())]),
            )
            .change(Op::Delete, 2, Some(vec![Datum::Int(9)]), None)
            .build()
    }

    #[test]
    fn posts_one_line_per_change() {
        testing::reset();
        testing::on_http(|_| {
            Ok(Response {
                status: 204,
                ..Default::default()
            })
        });
        let cfg = Config::new(vec![("url".into(), "http://127.0.0.1:9000/lines".into())]);
        let (mut sink, _) = Lines::init(&cfg).unwrap();
        sink.write(&batch()).unwrap();
        let sent = testing::requests();
        assert_eq!(
            String::from_utf8_lossy(&sent[0].body),
            "insert public.orders id=7\ndelete public.other id=9\n"
        );
        assert_eq!(testing::counter("lines"), 2);
    }

    #[test]
    fn server_errors_are_retryable_client_errors_dead_letters() {
        testing::reset();
        let cfg = Config::new(vec![
            ("url".into(), "http://h/x".into()),
            ("only_table".into(), "public.orders".into()),
        ]);
        let (mut sink, _) = Lines::init(&cfg).unwrap();
        testing::on_http(|_| {
            Ok(Response {
                status: 503,
                ..Default::default()
            })
        });
        assert!(matches!(
            sink.write(&batch()),
            Err(SinkError::Retryable { .. })
        ));
        testing::on_http(|_| {
            Ok(Response {
                status: 422,
                ..Default::default()
            })
        });
        assert!(matches!(sink.write(&batch()), Err(SinkError::DeadLetter(l)) if l.len() == 2));
        assert!(Lines::init(&Config::default()).is_err(), "url is required");
    }
}
