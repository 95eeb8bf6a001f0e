//! StarRocks over HTTP: Stream Load and the HTTP SQL API, with the outcome of each
//! request sorted into success, retry, dead letter or stop.
//!
//! Sources (StarRocks docs): "STREAM LOAD" (the request, the 307 redirect from FE to BE,
//! the response fields), "Stream Load transaction interface" (`Label Already Exists`,
//! `ExistingJobStatus`), "HTTP SQL API" (`POST /api/v1/catalogs/<catalog>/databases/<db>/sql`,
//! NDJSON answer).

use base64::Engine as _;
use dbmazz_sdk::http::{self, HttpError, Request, Response};
use dbmazz_sdk::SinkError;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Client {
    /// `http://fe-host:8030`, no trailing slash.
    pub fe: String,
    /// Database.
    pub database: String,
    /// `Basic ...`, or `None` when the host adds credentials (`http_auth`).
    pub authorization: Option<String>,
    /// Per request, ms.
    pub timeout_ms: u64,
    /// Replace a redirect target of `127.0.0.1`/`localhost` with the FE's host (BEs in
    /// containers advertise a loopback address).
    pub rewrite_loopback: bool,
    /// Where the FE sent each table's loads last time (`table` → BE URL).
    pub located: std::collections::HashMap<String, String>,
}

/// How a load ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// This request loaded `rows` rows.
    Now(u64),
    /// The label was loaded before (a replay): nothing to do.
    Before,
}

/// Why a load did not happen.
#[derive(Clone, Debug, PartialEq)]
pub enum LoadError {
    /// Retry, stop, ...: as the sink should answer.
    Sink(SinkError),
    /// StarRocks refused the rows themselves (filtered rows): dead-letter these changes.
    Rows(String),
}

/// A result of the HTTP SQL API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SqlResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<sonic_rs::Value>>,
}

/// Why a statement failed.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlError {
    /// StarRocks ran it and said no (`status: FAILED`, or HTTP 4xx): the message.
    Refused(String),
    /// Worth retrying: the FE is down, slow, or answered 5xx.
    Transient(String),
    /// Cannot work: credentials, allow-list, no HTTP SQL API.
    Fatal(String),
}

fn retry(message: String) -> SinkError {
    SinkError::retryable(message)
}

impl Client {
    /// `Basic base64(user:password)`.
    pub fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    fn request(&self, method: &str, url: &str, body: Vec<u8>) -> Request {
        let mut r = Request::new(method, url, body).timeout_ms(self.timeout_ms);
        if let Some(a) = &self.authorization {
            r = r.header("authorization", a.as_bytes().to_vec());
        }
        r
    }

    fn fe_host(&self) -> &str {
        http::split_url(&self.fe)
            .map(|(_, authority, _)| authority.rsplit_once(':').map_or(authority, |(h, _)| h))
            .unwrap_or("")
    }

    /// Follows a redirect's `Location`, rewriting a loopback BE address when configured.
    fn follow(&self, location: &str) -> String {
        if !self.rewrite_loopback {
            return location.to_string();
        }
        for lo in ["127.0.0.1", "localhost"] {
            for scheme in ["http://", "https://"] {
                let prefix = format!("{scheme}{lo}");
                if let Some(rest) = location.strip_prefix(&prefix) {
                    if rest.starts_with(':') || rest.starts_with('/') {
                        return format!("{scheme}{}{rest}", self.fe_host());
                    }
                }
            }
        }
        location.to_string()
    }

    fn transport(&self, e: HttpError) -> SinkError {
        match e {
            HttpError::Denied(m) => SinkError::Fatal(format!(
                "{m}: list the FE and every BE (http_port, usually 8040) in capabilities.http"
            )),
            HttpError::InvalidUrl(m) => SinkError::Fatal(format!("invalid StarRocks URL: {m}")),
            other => retry(format!("StarRocks: {other}")),
        }
    }

    fn http_failure(&self, url: &str, resp: &Response) -> SinkError {
        match resp.status {
            401 | 403 => SinkError::Fatal(format!(
                "StarRocks refused the credentials (HTTP {}) for {url}: {}; check user and password",
                resp.status,
                snippet(&resp.body)
            )),
            408 | 429 | 500..=599 => SinkError::Retryable {
                message: format!("HTTP {} from {url}: {}", resp.status, snippet(&resp.body)),
                retry_after_ms: resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .map(|s| s.saturating_mul(1000)),
            },
            status => SinkError::Fatal(format!(
                "HTTP {status} from {url}: {}; is {} a StarRocks FE HTTP port (8030)?",
                snippet(&resp.body),
                self.fe
            )),
        }
    }

    /// Asks the FE where `table`'s loads go: `PUT {fe}/api/{db}/{table}/_stream_load`
    /// with `Expect: 100-continue` and no body, which the FE answers with a 307 to a BE
    /// before any data is sent. (The WASI HTTP client cannot wait for `100 Continue`, so
    /// the body goes only to the BE; a body sent to an FE that answers early is cut off.)
    /// Without a label or data, nothing is loaded even if the FE ran it itself.
    fn locate(&self, table: &str) -> Result<String, SinkError> {
        let url = format!("{}/api/{}/{table}/_stream_load", self.fe, self.database);
        let probe = self
            .request("PUT", &url, Vec::new())
            .header("expect", "100-continue")
            .header("format", "json");
        let resp = http::send(&probe).map_err(|e| self.transport(e))?;
        match resp.status {
            301 | 302 | 307 | 308 => match resp.header("location") {
                Some(location) => Ok(self.follow(location)),
                None => Err(retry(format!(
                    "{url} answered {} without a Location",
                    resp.status
                ))),
            },
            200..=299 => {
                // An FE refuses some requests with 200 and a FAILED status (no
                // `Expect` header, an unknown database); otherwise it loads by itself:
                // send the data there.
                use sonic_rs::JsonValueTrait;
                let v: Option<sonic_rs::Value> = sonic_rs::from_slice(&resp.body).ok();
                let field = |a: &str, b: &str| {
                    v.as_ref()
                        .and_then(|v| v.get(a).or_else(|| v.get(b)))
                        .and_then(|x| x.as_str().map(str::to_string))
                };
                match field("Status", "status") {
                    Some(st)
                        if st.eq_ignore_ascii_case("failed") || st.eq_ignore_ascii_case("fail") =>
                    {
                        Err(SinkError::Fatal(format!(
                            "StarRocks FE refused loads into {}.{table}: {}",
                            self.database,
                            field("Msg", "msg")
                                .or_else(|| field("Message", "message"))
                                .unwrap_or_default()
                        )))
                    }
                    _ => Ok(url),
                }
            }
            _ => Err(self.http_failure(&url, &resp)),
        }
    }

    /// One Stream Load of `body` (a JSON array) into `table`: the FE redirects to a BE
    /// ([`Client::locate`], remembered per table), the BE gets the body with the
    /// credentials and the headers `label`, `format: json`, `strip_outer_array: true`,
    /// `columns`, `partial_update`, `merge_condition`.
    ///
    /// # Errors
    /// [`LoadError`]: auth failures, a missing table and a URL off the allow-list stop the
    /// pipeline; 5xx, timeouts, dropped connections, `Fail` and a job still running are
    /// retried; filtered rows are dead-lettered.
    pub fn stream_load(
        &mut self,
        table: &str,
        label: &str,
        columns: &str,
        partial: bool,
        merge_condition: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Loaded, LoadError> {
        let be = match self.located.get(table) {
            Some(u) => u.clone(),
            None => {
                let u = self.locate(table).map_err(LoadError::Sink)?;
                self.located.insert(table.to_string(), u.clone());
                u
            }
        };
        let mut req = self
            .request("PUT", &be, body)
            .accept_early_response()
            .header("expect", "100-continue")
            .header("content-type", "application/json")
            .header("label", label)
            .header("format", "json")
            .header("strip_outer_array", "true")
            .header("columns", columns);
        if partial {
            req = req.header("partial_update", "true");
        }
        if let Some(m) = merge_condition {
            req = req.header("merge_condition", m);
        }
        let result = self.send_load(table, label, &mut req);
        if matches!(&result, Err(LoadError::Sink(SinkError::Retryable { .. }))) {
            // The BE may be gone: ask the FE again next time.
            self.located.remove(table);
        }
        result
    }

    fn send_load(&self, table: &str, label: &str, req: &mut Request) -> Result<Loaded, LoadError> {
        for _hop in 0..4 {
            let resp = http::send(req).map_err(|e| LoadError::Sink(self.transport(e)))?;
            match resp.status {
                301 | 302 | 307 | 308 => {
                    let Some(location) = resp.header("location") else {
                        return Err(LoadError::Sink(retry(format!(
                            "{} answered {} without a Location",
                            req.url, resp.status
                        ))));
                    };
                    req.url = self.follow(location);
                }
                200..=299 => return outcome(&self.database, table, label, &resp),
                _ => return Err(LoadError::Sink(self.http_failure(&req.url, &resp))),
            }
        }
        Err(LoadError::Sink(retry(format!(
            "too many redirects loading {table} (last: {})",
            req.url
        ))))
    }

    /// Runs one statement through the HTTP SQL API (StarRocks 3.2 and later).
    ///
    /// # Errors
    /// [`SqlError`].
    pub fn sql(&self, query: &str) -> Result<SqlResult, SqlError> {
        let url = format!(
            "{}/api/v1/catalogs/default_catalog/databases/{}/sql",
            self.fe, self.database
        );
        let body = sonic_rs::to_vec(&sonic_rs::json!({ "query": query }))
            .map_err(|e| SqlError::Fatal(e.to_string()))?;
        let req = self
            .request("POST", &url, body)
            .header("content-type", "application/json");
        let resp = match http::send(&req) {
            Ok(r) => r,
            Err(e @ (HttpError::Denied(_) | HttpError::InvalidUrl(_))) => {
                return Err(SqlError::Fatal(e.to_string()))
            }
            Err(e) => return Err(SqlError::Transient(format!("StarRocks SQL API: {e}"))),
        };
        match resp.status {
            401 | 403 => {
                return Err(SqlError::Fatal(format!(
                    "StarRocks refused the credentials (HTTP {}): {}; check user and password",
                    resp.status,
                    snippet(&resp.body)
                )))
            }
            404 => {
                return Err(SqlError::Fatal(format!(
                    "{url} not found: the HTTP SQL API needs StarRocks 3.2 or later (or set setup = false)"
                )))
            }
            408 | 429 | 500..=599 => {
                return Err(SqlError::Transient(format!(
                    "HTTP {} from the SQL API: {}",
                    resp.status,
                    snippet(&resp.body)
                )))
            }
            _ => {}
        }
        let mut out = SqlResult::default();
        for line in resp.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: sonic_rs::Value = sonic_rs::from_slice(line).map_err(|e| {
                SqlError::Refused(format!(
                    "unreadable SQL API answer ({e}): {}",
                    snippet(line)
                ))
            })?;
            use sonic_rs::{JsonContainerTrait, JsonValueTrait};
            if v.get("status").and_then(|s| s.as_str()) == Some("FAILED") || resp.status >= 400 {
                let msg = v
                    .get("msg")
                    .or_else(|| v.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("(no message)");
                return Err(SqlError::Refused(msg.to_string()));
            }
            if let Some(meta) = v.get("meta").and_then(|m| m.as_array()) {
                out.columns = meta
                    .iter()
                    .map(|c| {
                        c.get("name")
                            .and_then(|n| n.as_str())
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect();
            }
            if let Some(row) = v.get("data").and_then(|d| d.as_array()) {
                out.rows.push(row.iter().cloned().collect());
            }
        }
        Ok(out)
    }
}

fn snippet(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

/// Reads a Stream Load answer (`Status`, `Message`, `ExistingJobStatus`, `ErrorURL`,
/// `NumberLoadedRows`, `NumberFilteredRows`).
fn outcome(db: &str, table: &str, label: &str, resp: &Response) -> Result<Loaded, LoadError> {
    use sonic_rs::JsonValueTrait;
    let v: sonic_rs::Value = sonic_rs::from_slice(&resp.body).map_err(|e| {
        LoadError::Sink(retry(format!(
            "unreadable Stream Load answer for {label} ({e}): {}",
            snippet(&resp.body)
        )))
    })?;
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let either = |a: &str, b: &str| {
        let t = text(a);
        if t.is_empty() {
            text(b)
        } else {
            t
        }
    };
    let status = either("Status", "status");
    let message = either("Message", "msg");
    match status.as_str() {
        "Success" | "Publish Timeout" => Ok(Loaded::Now(
            v.get("NumberLoadedRows")
                .and_then(|n| n.as_u64())
                .unwrap_or(0),
        )),
        "Label Already Exists" => match text("ExistingJobStatus").as_str() {
            "FINISHED" | "VISIBLE" | "COMMITTED" => Ok(Loaded::Before),
            job => Err(LoadError::Sink(SinkError::Retryable {
                message: format!("label {label}: the earlier load is {job}; asking again"),
                retry_after_ms: Some(1000),
            })),
        },
        "Fail" | "FAILED" => {
            let lower = message.to_ascii_lowercase();
            if lower.contains("access denied") {
                Err(LoadError::Sink(SinkError::Fatal(format!(
                    "StarRocks refused the credentials loading {db}.{table}: {message}"
                ))))
            } else if lower.contains("unknown table") || lower.contains("does not exist") {
                Err(LoadError::Sink(SinkError::Fatal(format!(
                    "table {db}.{table} does not exist in StarRocks: create it as a Primary Key table ({message})"
                ))))
            } else if v
                .get("NumberFilteredRows")
                .and_then(|n| n.as_u64())
                .is_some_and(|n| n > 0)
                || lower.contains("filtered rows")
            {
                Err(LoadError::Rows(format!(
                    "StarRocks filtered rows of {db}.{table} (label {label}): {message}; details: {}",
                    text("ErrorURL")
                )))
            } else {
                Err(LoadError::Sink(retry(format!(
                    "Stream Load of {db}.{table} (label {label}) failed: {message}"
                ))))
            }
        }
        other => Err(LoadError::Sink(retry(format!(
            "Stream Load of {db}.{table} (label {label}) answered Status {other:?}: {message}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(body: &str) -> Response {
        Response {
            status: 200,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn outcomes() {
        let o = |b: &str| outcome("db", "t", "l", &resp(b));
        assert_eq!(
            o(r#"{"Status":"Success","NumberLoadedRows":3}"#),
            Ok(Loaded::Now(3))
        );
        assert_eq!(
            o(r#"{"Status":"Publish Timeout","NumberLoadedRows":3}"#),
            Ok(Loaded::Now(3))
        );
        assert_eq!(
            o(r#"{"Status":"Label Already Exists","ExistingJobStatus":"FINISHED"}"#),
            Ok(Loaded::Before)
        );
        assert!(matches!(
            o(r#"{"Status":"Label Already Exists","ExistingJobStatus":"RUNNING"}"#),
            Err(LoadError::Sink(SinkError::Retryable {
                retry_after_ms: Some(1000),
                ..
            }))
        ));
        assert!(matches!(
            o(r#"{"Status":"Fail","Message":"unknown table, tableName=t"}"#),
            Err(LoadError::Sink(SinkError::Fatal(_)))
        ));
        assert!(matches!(
            o(r#"{"Status":"Fail","Message":"Access denied for user"}"#),
            Err(LoadError::Sink(SinkError::Fatal(_)))
        ));
        assert!(matches!(
            o(r#"{"Status":"Fail","Message":"too many filtered rows","NumberFilteredRows":2,"ErrorURL":"http://be/x"}"#),
            Err(LoadError::Rows(m)) if m.contains("http://be/x")
        ));
        assert!(matches!(
            o(r#"{"Status":"Fail","Message":"internal error"}"#),
            Err(LoadError::Sink(SinkError::Retryable { .. }))
        ));
        assert!(matches!(
            o("not json"),
            Err(LoadError::Sink(SinkError::Retryable { .. }))
        ));
    }

    #[test]
    fn loopback_rewrite() {
        let c = Client {
            fe: "http://fe.example:8030".into(),
            database: "d".into(),
            authorization: None,
            timeout_ms: 1,
            rewrite_loopback: true,
            located: Default::default(),
        };
        assert_eq!(
            c.follow("http://127.0.0.1:8040/api/d/t/_stream_load"),
            "http://fe.example:8040/api/d/t/_stream_load"
        );
        assert_eq!(c.follow("http://10.0.0.5:8040/x"), "http://10.0.0.5:8040/x");
        let off = Client {
            rewrite_loopback: false,
            ..c
        };
        assert_eq!(
            off.follow("http://127.0.0.1:8040/x"),
            "http://127.0.0.1:8040/x"
        );
    }
}
