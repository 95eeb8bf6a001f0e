//! A receiver that only counts: each POST's changes are counted (occurrences of a marker
//! that each change's JSON holds once: `"specversion"` in sink-webhook's CloudEvents,
//! `"commit_lsn"` in the SDK templates' JSON lines) and answered 200, after an optional
//! delay (to hold the pipeline's buffers full).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// A running receiver.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Changes (CloudEvents) received.
    pub events: Arc<AtomicU64>,
}

/// sink-webhook's marker: one per CloudEvent.
pub const CLOUDEVENTS: &str = "\"specversion\"";
/// The SDK templates' marker: one per JSON line.
pub const JSON_LINES: &str = "\"commit_lsn\"";

/// Starts a receiver on 127.0.0.1 (a free port) counting `marker`; each answer waits
/// `delay`.
pub async fn start(delay: Duration, marker: &'static str) -> anyhow::Result<Receiver> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let events = Arc::new(AtomicU64::new(0));
    let counted = events.clone();
    tokio::spawn(async move {
        let finder = memchr::memmem::Finder::new(marker.as_bytes()).into_owned();
        let finder = Arc::new(finder);
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            let finder = finder.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let counted = counted.clone();
                    let finder = finder.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let n = finder.find_iter(&body).count() as u64;
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        counted.fetch_add(n, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(Receiver { addr, events })
}
