//! A small blocking HTTP client over `wasi:http/outgoing-handler`, for sinks.
//!
//! The host sends the request only when the target `host:port` is on the plugin's
//! allow-list (`capabilities = { http = ["host:port"] }`); any other host fails with
//! [`HttpError::Denied`]. The host may add configured credentials (an `Authorization`
//! header) on its side, so secrets need not live in the plugin's config.
//!
//! ```no_run
//! use dbmazz_sdk::http::{send, Request};
//! let resp = send(&Request::post("http://127.0.0.1:9000/events", b"{}".to_vec())
//!     .header("content-type", "application/json")
//!     .timeout_ms(5_000))?;
//! assert!(resp.status < 300);
//! # Ok::<(), dbmazz_sdk::http::HttpError>(())
//! ```

use std::fmt;

/// An outgoing request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, `PUT`, ...
    pub method: String,
    /// `http://host:port/path?query` (or https).
    pub url: String,
    /// Header names and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// Timeout for connecting and for the first response byte, ms.
    pub timeout_ms: Option<u64>,
    /// Accept a success the server sent before it had read the whole body (off by
    /// default: then a 2xx without the whole body sent is an error). For protocols whose
    /// answer does not depend on the body, such as StarRocks answering `Label Already
    /// Exists` from the headers.
    pub early_response: bool,
}

impl Request {
    /// A request with no headers and no timeout.
    pub fn new(method: &str, url: &str, body: Vec<u8>) -> Self {
        Request {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body,
            timeout_ms: None,
            early_response: false,
        }
    }

    /// A POST.
    pub fn post(url: &str, body: Vec<u8>) -> Self {
        Self::new("POST", url, body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Accepts an answer sent before the whole body was read (see
    /// [`Request::early_response`]).
    pub fn accept_early_response(mut self) -> Self {
        self.early_response = true;
        self
    }

    /// Sets the timeout.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }
}

/// A response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused: the target is not on the plugin's allow-list.
    Denied(String),
    /// The URL is not `http(s)://authority/path`.
    InvalidUrl(String),
    /// Connecting or waiting for the response took longer than the timeout.
    Timeout(String),
    /// Anything else (connection refused, reset, protocol error).
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(m) => write!(f, "request denied by the host: {m}"),
            HttpError::InvalidUrl(m) => write!(f, "invalid URL: {m}"),
            HttpError::Timeout(m) => write!(f, "timed out: {m}"),
            HttpError::Failed(m) => write!(f, "request failed: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Splits `scheme://authority/path?query`.
pub fn split_url(url: &str) -> Result<(&str, &str, &str), HttpError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| HttpError::InvalidUrl(url.into()))?;
    if scheme != "http" && scheme != "https" {
        return Err(HttpError::InvalidUrl(format!(
            "{url}: scheme must be http or https"
        )));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(HttpError::InvalidUrl(url.into()));
    }
    Ok((scheme, authority, path))
}

/// Sends a request and reads the whole response.
///
/// # Errors
/// [`HttpError`]; an HTTP error status is a response, not an error.
pub fn send(req: &Request) -> Result<Response, HttpError> {
    #[cfg(target_arch = "wasm32")]
    return wasi_send(req);
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::http_send(req);
}

/// Writes `data` to a wasi:io output stream as fast as the host takes it: as much per
/// `write` as `check-write` permits (wasmtime's HTTP body takes 1 MiB at a time), waiting on
/// the stream's pollable when it permits nothing, then flushes and waits for the flush —
/// the loop the wasi:io documentation gives for `blocking-write-and-flush`, without that
/// function's limit of 4,096 bytes per call (a 5 MB Stream Load body was 1,200 host calls).
///
/// # Errors
/// The stream's error (closed, or the last operation failed).
#[cfg(target_arch = "wasm32")]
fn write_all(
    stream: &wasip2::io::streams::OutputStream,
    mut data: &[u8],
) -> Result<(), wasip2::io::streams::StreamError> {
    use wasip2::io::streams::StreamError;
    let pollable = stream.subscribe();
    while !data.is_empty() {
        let permitted = stream.check_write()?;
        if permitted == 0 {
            pollable.block();
            continue;
        }
        let n = data
            .len()
            .min(usize::try_from(permitted).unwrap_or(usize::MAX));
        let (chunk, rest) = data.split_at(n);
        stream.write(chunk)?;
        data = rest;
    }
    // As wasmtime's own `blocking-write-and-flush` does: a stream that closed once every
    // byte was written (the body reached its content-length) is not an error here.
    let closed_is_done = |r: Result<(), StreamError>| match r {
        Ok(()) | Err(StreamError::Closed) => Ok(()),
        Err(e) => Err(e),
    };
    closed_is_done(stream.flush())?;
    loop {
        pollable.block();
        match stream.check_write() {
            // zero while the flush is still under way
            Ok(0) => continue,
            r => return closed_is_done(r.map(drop)),
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn wasi_send(req: &Request) -> Result<Response, HttpError> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{
        ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
    };
    use wasip2::io::streams::StreamError;

    let (scheme, authority, path) = split_url(&req.url)?;
    let failed = |what: &str, e: &dyn fmt::Debug| HttpError::Failed(format!("{what}: {e:?}"));
    let mut entries: Vec<(String, Vec<u8>)> = req.headers.clone();
    // The body's size is known: say so, rather than sending it chunked.
    if !entries
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        && req.method != "GET"
        && req.method != "HEAD"
    {
        entries.push((
            "content-length".into(),
            req.body.len().to_string().into_bytes(),
        ));
    }
    let headers = Fields::from_list(&entries).map_err(|e| failed("headers", &e))?;
    let request = OutgoingRequest::new(headers);
    let method = match req.method.as_str() {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    };
    request
        .set_method(&method)
        .map_err(|()| HttpError::Failed("method".into()))?;
    request
        .set_scheme(Some(&if scheme == "https" {
            Scheme::Https
        } else {
            Scheme::Http
        }))
        .map_err(|()| HttpError::Failed("scheme".into()))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| HttpError::InvalidUrl(req.url.clone()))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| HttpError::InvalidUrl(req.url.clone()))?;
    let options = RequestOptions::new();
    if let Some(ms) = req.timeout_ms {
        let ns = ms.saturating_mul(1_000_000);
        let _ = options.set_connect_timeout(Some(ns));
        let _ = options.set_first_byte_timeout(Some(ns));
        let _ = options.set_between_bytes_timeout(Some(ns));
    }
    let body = request
        .body()
        .map_err(|()| HttpError::Failed("request body".into()))?;
    let pending =
        outgoing_handler::handle(request, Some(options)).map_err(|e| map_code(e, &req.url))?;
    // If the host refuses the request (allow-list) or the connection fails, the body
    // stream closes early; the response future then holds the real error code.
    let mut body_error = None;
    {
        let stream = body
            .write()
            .map_err(|()| HttpError::Failed("body stream".into()))?;
        if let Err(e) = write_all(&stream, &req.body) {
            body_error = Some(failed("writing the body", &e));
        }
    }
    let finished = OutgoingBody::finish(body, None);
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(code))) => return Err(map_code(code, &req.url)),
        Some(Err(())) | None => return Err(HttpError::Failed("response already taken".into())),
    };
    let status = response.status();
    // A server may answer before it has read the body (a redirect, a refusal): that
    // answer stands. A success without the whole body does not.
    match body_error {
        Some(e) if (200..300).contains(&status) && !req.early_response => return Err(e),
        Some(_) => {}
        None => finished.map_err(|e| map_code(e, &req.url))?,
    }
    let headers = response.headers().entries();
    let incoming = response
        .consume()
        .map_err(|()| HttpError::Failed("response body".into()))?;
    let mut out = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| HttpError::Failed("response stream".into()))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => return Err(failed("reading the response", &e)),
            }
        }
    }
    fn map_code(code: ErrorCode, url: &str) -> HttpError {
        match code {
            ErrorCode::HttpRequestDenied => {
                HttpError::Denied(format!("{url} is not on this plugin's http allow-list"))
            }
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::HttpResponseTimeout => HttpError::Timeout(format!("{url}: {code:?}")),
            other => HttpError::Failed(format!("{url}: {other:?}")),
        }
    }
    Ok(Response {
        status,
        headers,
        body: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://h:1/a?b=c").unwrap(),
            ("http", "h:1", "/a?b=c")
        );
        assert_eq!(split_url("https://h").unwrap(), ("https", "h", "/"));
        assert!(split_url("ftp://h/").is_err());
        assert!(split_url("h/x").is_err());
    }
}
