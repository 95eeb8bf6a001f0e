//! A TCP fault proxy for the tests: it sits between `dbmazz` and PostgreSQL and can
//! reset every connection, blackhole them (a silently dead peer) or slow them down.
//!
//! It runs on threads of its own (two per connection, one per direction, plus the
//! acceptor), so it works whatever runtime, if any, the test uses. Sockets have short
//! read and write timeouts so that every thread notices a control change within a few
//! milliseconds; nothing is lost by that, a timed-out read is simply tried again.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a blocked thread looks at the controls.
const TICK: Duration = Duration::from_millis(10);
/// Bound on connecting to the upstream server.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP proxy from `127.0.0.1:<port()>` to `127.0.0.1:<upstream port>` with fault
/// injection. Dropping it stops accepting and resets every connection it still holds.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    blackhole: AtomicBool,
    delay_us: AtomicU64,
    accepted: AtomicUsize,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Bumped by every reset, under the `conns` lock: a connection whose upstream side
    /// was still being opened when a reset happened is reset as soon as it is ready.
    epoch: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// One proxied connection: the client's socket and, unless it was accepted into a
/// blackhole, the upstream one.
struct Conn {
    client: TcpStream,
    upstream: Option<TcpStream>,
    /// Set by a reset (or an error on one side): the pumps stop without sending FIN, and
    /// the sockets, which have SO_LINGER 0, send RST when the last reference closes them.
    killed: AtomicBool,
    /// Seen by a blackhole: nothing is forwarded on it any more, until it is reset.
    caught: AtomicBool,
    /// Pumps still running; the last one to stop removes the connection from the table.
    live_pumps: AtomicUsize,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl Conn {
    /// Marks the connection for an abortive close: SO_LINGER 0 on both sockets, so that
    /// closing them sends RST instead of FIN.
    fn abort(&self) {
        self.killed.store(true, Ordering::SeqCst);
        for s in std::iter::once(&self.client).chain(self.upstream.as_ref()) {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1` on a free port ([`FaultProxy::port`]);
    /// every accepted connection is forwarded to `127.0.0.1:upstream_port`. When the
    /// upstream connection cannot be opened (the server is down), the client's
    /// connection is reset, as a refused connection would be.
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            blackhole: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{port}-accept"))
            .spawn(move || accept_loop(listener, s))
            .expect("proxy: spawn the acceptor");
        FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port the proxy listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `url` (a `postgres://` URL naming `127.0.0.1:<upstream port>`) with the port
    /// replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let upstream = format!(":{}/", self.shared.upstream.port());
        assert!(url.contains(&upstream), "{url} does not go to {upstream}");
        url.replacen(&upstream, &format!(":{}/", self.port), 1)
    }

    /// Closes every current connection abruptly: both the client's and the upstream
    /// socket get SO_LINGER 0 and are closed, so each peer receives a TCP RST (a read
    /// or write fails with "connection reset"), never a FIN. Returns once the sockets
    /// are closed. Connections accepted afterwards are forwarded as usual (unless the
    /// proxy is blackholed). Connections caught in a blackhole are reset too.
    pub fn reset(&self) {
        let conns: Vec<Arc<Conn>> = {
            let mut map = self.shared.conns.lock().unwrap();
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
            map.drain().map(|(_, c)| c).collect()
        };
        reset_all(conns);
    }

    /// Turns the blackhole on or off.
    ///
    /// While on, the proxy behaves like a silently dead peer (a cable pulled, a NAT or
    /// firewall dropping packets): on every open connection, bytes are neither forwarded
    /// nor answered in either direction, and nothing is closed (no RST, no FIN); the
    /// proxy stops reading, so a sender's data sits in the socket buffers. New
    /// connections are accepted (the TCP handshake succeeds) but go nowhere: no upstream
    /// connection is opened for them, nothing is ever answered.
    ///
    /// Turning it off resets (RST to both sides, as [`FaultProxy::reset`]) every
    /// connection that was open or accepted while it was on — like a middlebox that
    /// forgot their state — and forwards new connections again.
    pub fn set_blackhole(&self, on: bool) {
        if on {
            let map = self.shared.conns.lock().unwrap();
            self.shared.blackhole.store(true, Ordering::SeqCst);
            for c in map.values() {
                c.caught.store(true, Ordering::SeqCst);
            }
        } else {
            let caught: Vec<Arc<Conn>> = {
                let mut map = self.shared.conns.lock().unwrap();
                self.shared.blackhole.store(false, Ordering::SeqCst);
                let ids: Vec<u64> = map
                    .iter()
                    .filter(|(_, c)| c.caught.load(Ordering::SeqCst))
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| map.remove(id)).collect()
            };
            reset_all(caught);
        }
    }

    /// Delays every forwarded chunk (whatever one read returned, up to 64 KiB) by
    /// `delay` before it is written on, in both directions; `Duration::ZERO` turns it
    /// off. Chunks stay in order; a direction forwards one chunk at a time, so a delay
    /// also bounds its throughput.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// How many connections the proxy has accepted since it started (including those
    /// accepted into a blackhole or reset since).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // wake the acceptor
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.reset();
    }
}

fn reset_all(conns: Vec<Arc<Conn>>) {
    for c in &conns {
        c.abort();
    }
    for c in &conns {
        let pumps: Vec<JoinHandle<()>> = std::mem::take(&mut *c.pumps.lock().unwrap());
        for p in pumps {
            let _ = p.join();
        }
    }
    // The pumps are gone; dropping the last references closes the sockets (RST).
    drop(conns);
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let _ = client.set_read_timeout(Some(TICK));
        let _ = client.set_write_timeout(Some(TICK));
        let epoch = {
            let mut map = shared.conns.lock().unwrap();
            if shared.blackhole.load(Ordering::SeqCst) {
                // accepted, but goes nowhere: held until the blackhole ends (or a reset)
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                map.insert(
                    id,
                    Arc::new(Conn {
                        client,
                        upstream: None,
                        killed: AtomicBool::new(false),
                        caught: AtomicBool::new(true),
                        live_pumps: AtomicUsize::new(0),
                        pumps: Mutex::new(Vec::new()),
                    }),
                );
                continue;
            }
            shared.epoch.load(Ordering::SeqCst)
        };
        let s = shared.clone();
        // Opening the upstream side may take a while: not on the acceptor.
        let _ = std::thread::Builder::new()
            .name("proxy-connect".into())
            .spawn(move || connect_upstream(client, epoch, s));
    }
}

fn connect_upstream(client: TcpStream, epoch: u64, shared: Arc<Shared>) {
    let upstream = match TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT) {
        Ok(u) => u,
        Err(_) => {
            // as a refused connection: RST
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = upstream.set_read_timeout(Some(TICK));
    let _ = upstream.set_write_timeout(Some(TICK));
    let conn = Arc::new(Conn {
        client,
        upstream: Some(upstream),
        killed: AtomicBool::new(false),
        caught: AtomicBool::new(false),
        live_pumps: AtomicUsize::new(2),
        pumps: Mutex::new(Vec::new()),
    });
    let mut map = shared.conns.lock().unwrap();
    if shared.epoch.load(Ordering::SeqCst) != epoch || shared.stopping.load(Ordering::SeqCst) {
        // a reset happened while connecting: this connection was current, so it goes too
        drop(map);
        conn.abort();
        return;
    }
    if shared.blackhole.load(Ordering::SeqCst) {
        conn.caught.store(true, Ordering::SeqCst);
    }
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    map.insert(id, conn.clone());
    let mut pumps = conn.pumps.lock().unwrap();
    for to_upstream in [true, false] {
        let (c, s) = (conn.clone(), shared.clone());
        pumps.push(
            std::thread::Builder::new()
                .name(format!("proxy-pump-{id}"))
                .spawn(move || pump(id, c, to_upstream, s))
                .expect("proxy: spawn a pump"),
        );
    }
}

/// Forwards one direction of `conn` until either side closes, an error, or a reset.
fn pump(id: u64, conn: Arc<Conn>, to_upstream: bool, shared: Arc<Shared>) {
    let upstream = conn
        .upstream
        .as_ref()
        .expect("pumps run on forwarded connections");
    let (mut src, mut dst) = if to_upstream {
        (&conn.client, upstream)
    } else {
        (upstream, &conn.client)
    };
    let mut buf = vec![0u8; 64 * 1024];
    let stopped = |c: &Conn| c.killed.load(Ordering::SeqCst);
    let held = |c: &Conn| {
        if shared.blackhole.load(Ordering::SeqCst) {
            c.caught.store(true, Ordering::SeqCst);
        }
        c.caught.load(Ordering::SeqCst)
    };
    'outer: loop {
        if stopped(&conn) {
            break;
        }
        if held(&conn) {
            // a dead peer: read nothing, write nothing, close nothing
            std::thread::sleep(TICK);
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => {
                // orderly close: pass the FIN on (unless a fault took over meanwhile)
                if !stopped(&conn) && !held(&conn) {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                break;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                // the peer reset (or the socket broke): the other side gets a reset too
                conn.abort();
                break;
            }
        };
        let delay = Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
        if !delay.is_zero() {
            let due = Instant::now() + delay;
            while Instant::now() < due {
                if stopped(&conn) {
                    break 'outer;
                }
                std::thread::sleep(TICK.min(due.saturating_duration_since(Instant::now())));
            }
        }
        let mut off = 0;
        while off < n {
            if stopped(&conn) || held(&conn) {
                // dropped on the floor: this connection is reset before it forwards again
                continue 'outer;
            }
            match dst.write(&buf[off..n]) {
                Ok(0) => {
                    conn.abort();
                    break 'outer;
                }
                Ok(w) => off += w,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    conn.abort();
                    break 'outer;
                }
            }
        }
    }
    if conn.live_pumps.fetch_sub(1, Ordering::SeqCst) == 1 {
        // the last pump of this connection: forget it, which closes it once the
        // resetter (if any) lets go too
        shared.conns.lock().unwrap().remove(&id);
    }
}
