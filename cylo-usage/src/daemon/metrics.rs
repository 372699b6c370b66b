//! `serve --metrics ADDR`: the daemon's state for a fleet's Prometheus, over plain HTTP
//! (`GET /metrics`, `HEAD /metrics`), served the way exporters built on the Prometheus client
//! libraries serve it.
//!
//! - **Content negotiation.** A scraper whose `Accept` prefers `application/openmetrics-text`
//!   gets OpenMetrics 1.0.0 (encoded by `prometheus-client`); every other scraper (`text/plain;
//!   version=0.0.4`, `*/*`, no `Accept` at all) gets the classic text exposition format 0.0.4,
//!   rendered here from the same values ([`Family`]).
//! - **Base units.** Times are in seconds, sizes in bytes, as both formats ask.
//! - **No scrape waits for another client.** Each connection is served on a short-lived
//!   thread of its own, under ONE deadline ([`DEADLINE`]) for the whole exchange: the time
//!   left is computed before every read and every write, so a client that trickles its
//!   request (or takes the answer a byte at a time) holds only its own connection, and only
//!   until the deadline. At most [`MAX_SCRAPES`] connections are served at once, at most
//!   [`MAX_SCRAPES_PER_PEER`] from one address; past either, a connection is answered `503`
//!   and closed at once, never queued behind slow ones. A request head is at most
//!   [`MAX_HEAD`] bytes.
//! - **Kernel state is read by one scrape at a time.** Walking the membership maps takes the
//!   tracker's map lock, which sessions need too; concurrent scrapes share one walk that
//!   started after they arrived (so nothing served is older than the request), and never
//!   queue more than one walker on that lock.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use crate::kernel::tracker::RunsTotals;
use crate::sys::lock;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::DaemonError;
use super::counters::Source;
use super::limits::Limit;

/// The whole exchange with one scraper (reading its request, writing the answer) ends by
/// then, however slowly it sends or reads.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);
/// The largest request head read; a longer one is answered `431`.
pub(crate) const MAX_HEAD: usize = 8 << 10;
/// Scrape connections served at once; past it a new one is refused (`503`) at once.
pub(crate) const MAX_SCRAPES: usize = 64;
/// Scrape connections served at once for one peer address, so that one host (or one local
/// user, on a loopback address of its own) cannot take every slot from the fleet's scraper.
pub(crate) const MAX_SCRAPES_PER_PEER: usize = 8;
/// The stack of a scrape's thread: it parses a head and formats a few kilobytes.
const SCRAPE_STACK: usize = 256 << 10;
/// How long, at most, the end of a connection waits for the client to close first (so that
/// a request it sent past its head does not turn the close into a reset that discards the
/// answer). Always within [`DEADLINE`] too.
const LINGER: Duration = Duration::from_secs(1);

/// The classic text exposition format's content type.
pub(crate) const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics' content type.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves scrapes: one thread accepts, one short-lived thread per connection
/// answers.
pub(crate) fn start(addr: SocketAddr, state: Arc<dyn Source>) -> Result<(), DaemonError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| DaemonError::Metrics { addr, source })?;
    let endpoint = Arc::new(Endpoint {
        state,
        seats: Mutex::default(),
        refused_total: AtomicU64::new(0),
        refused_per_peer: AtomicU64::new(0),
        timed_out: AtomicU64::new(0),
        kernel: Mutex::new(None),
    });
    std::thread::Builder::new()
        .name("metrics".to_string())
        .spawn(move || endpoint.accept_loop(listener))
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    Ok(())
}

/// The endpoint's own state: who holds a seat, what was refused, the last kernel walk.
struct Endpoint {
    state: Arc<dyn Source>,
    seats: Mutex<Seats>,
    /// Connections refused because [`MAX_SCRAPES`] were open.
    refused_total: AtomicU64,
    /// Connections refused because [`MAX_SCRAPES_PER_PEER`] were open from their address.
    refused_per_peer: AtomicU64,
    /// Connections closed at [`DEADLINE`] before their exchange was done.
    timed_out: AtomicU64,
    /// The last walk of the kernel's state, and when it started.
    kernel: Mutex<Option<(Instant, Arc<Kernel>)>>,
}

/// Scrape connections being served.
#[derive(Default)]
struct Seats {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// A connection's place among [`MAX_SCRAPES`]; given back when dropped.
struct Seat {
    endpoint: Arc<Endpoint>,
    peer: IpAddr,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut seats = self.endpoint.seats();
        seats.total -= 1;
        if let Some(n) = seats.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                seats.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Which limit refused a scrape connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeatLimit {
    Total,
    PerPeer,
}

/// The kernel-side figures, read under the tracker's locks.
struct Kernel {
    /// What every session failed to follow (records lost, tasks killed at birth or escaped).
    totals: RunsTotals,
    /// (map, entries, capacity).
    fill: Vec<(&'static str, usize, u32)>,
    /// (program, run time in ns, calls), with `--bpf-stats`.
    programs: Option<Vec<(String, u64, u64)>>,
}

impl Endpoint {
    fn seats(&self) -> MutexGuard<'_, Seats> {
        lock(&self.seats)
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                // A connection that went away before it was accepted: the next one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                    ) => {}
                // Out of descriptors or memory (or worse): the pending connections wait in
                // the backlog (and their clients time out) rather than this loop spinning.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Gives `stream` a seat and a thread, or refuses it at once.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let peer = peer.ip().to_canonical();
        let seat = match self.take_seat(peer) {
            Ok(seat) => seat,
            Err(limit) => {
                match limit {
                    SeatLimit::Total => &self.refused_total,
                    SeatLimit::PerPeer => &self.refused_per_peer,
                }
                .fetch_add(1, Ordering::Relaxed);
                refuse(stream, limit);
                return;
            }
        };
        let endpoint = self.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-scrape".to_string())
            .stack_size(SCRAPE_STACK)
            .spawn(move || {
                let _seat = seat;
                endpoint.serve(stream);
            });
        // No thread (out of memory or threads): the closure, the stream and the seat are
        // dropped, which closes the connection and frees the seat.
        if spawned.is_err() {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take_seat(self: &Arc<Self>, peer: IpAddr) -> Result<Seat, SeatLimit> {
        let mut seats = self.seats();
        if seats.total >= MAX_SCRAPES {
            return Err(SeatLimit::Total);
        }
        let mine = seats.by_peer.entry(peer).or_default();
        if *mine >= MAX_SCRAPES_PER_PEER {
            return Err(SeatLimit::PerPeer);
        }
        *mine += 1;
        seats.total += 1;
        Ok(Seat {
            endpoint: self.clone(),
            peer,
        })
    }

    /// One exchange, all of it before `DEADLINE` from now.
    fn serve(&self, mut stream: TcpStream) {
        let deadline = Instant::now() + DEADLINE;
        let response = match read_head(&mut stream, deadline) {
            Ok(Head::Complete(head)) => match Request::parse(&head) {
                Some(request) => self.respond(&request),
                None => {
                    Response::plain("400 Bad Request", "a request line: GET /metrics HTTP/1.1\n")
                        .bytes(false)
                }
            },
            Ok(Head::TooLarge) => Response::plain(
                "431 Request Header Fields Too Large",
                "the request head is larger than 8 KiB\n",
            )
            .bytes(false),
            Ok(Head::Closed) => return,
            Err(e) => {
                if is_timeout(&e) {
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        match write_all_by(&mut stream, &response, deadline) {
            Ok(()) => linger(&mut stream, deadline),
            Err(e) if is_timeout(&e) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    fn respond(&self, request: &Request) -> Vec<u8> {
        let head_only = request.method == "HEAD";
        let response = if request.method != "GET" && !head_only {
            Response::plain("405 Method Not Allowed", "GET or HEAD only\n")
                .header("Allow", "GET, HEAD")
        } else if request.path == "/metrics" || request.path.starts_with("/metrics?") {
            let families = self.collect();
            let (kind, body) = match negotiate(request.accept.as_deref()) {
                Format::OpenMetrics => (OPENMETRICS, openmetrics(families)),
                Format::Text004 => (TEXT_004, text_004(&families)),
            };
            Response {
                status: "200 OK",
                content_type: kind,
                extra: vec![("Vary", "Accept")],
                body: body.into_bytes(),
            }
        } else {
            Response::plain("404 Not Found", "see /metrics\n")
        };
        response.bytes(head_only)
    }

    /// The kernel's state, from a walk that started after this call did: this scrape's own,
    /// or the one another scrape made while this one waited for its turn.
    fn kernel(&self) -> Arc<Kernel> {
        let arrived = Instant::now();
        let mut last = lock(&self.kernel);
        if let Some((started, kernel)) = last.as_ref()
            && *started >= arrived
        {
            return kernel.clone();
        }
        let started = Instant::now();
        let state = &self.state;
        let (totals, fill) = state.kernel_state();
        let programs = state.program_stats();
        let kernel = Arc::new(Kernel {
            totals,
            fill,
            programs,
        });
        *last = Some((started, kernel.clone()));
        kernel
    }

    /// Every metric as it is now.
    fn collect(&self) -> Vec<Family> {
        let state = &self.state;
        let c = state.counters();
        let kernel = self.kernel();
        let (active, connections) = state.sessions_and_connections();
        let load = |a: &AtomicU64| Number::UInt(a.load(Ordering::Relaxed));
        let mut families = vec![
            Family::gauge(
                "sessions_active",
                "Sessions open now",
                Number::UInt(active as u64),
            ),
            Family::gauge(
                "connections_active",
                "Client connections open now",
                Number::UInt(connections as u64),
            ),
            Family::counter(
                "sessions",
                "Sessions opened since the daemon started",
                load(&c.sessions_total),
            ),
            Family::counter(
                "sessions_refused",
                "Sessions refused by the per-user limit",
                load(&c.sessions_refused),
            ),
            Family::counter(
                "connections",
                "Client connections accepted",
                load(&c.connections_total),
            ),
            Family::counter("requests", "Requests received", load(&c.requests_total)),
            Family::counter(
                "bad_requests",
                "Requests refused as malformed",
                load(&c.bad_requests_total),
            ),
            Family::counter(
                "lost_events",
                "Records the kernel side could not make (a map or ring buffer full), over all \
                 sessions",
                Number::UInt(kernel.totals.lost_events),
            ),
            Family::counter(
                "tasks_killed_at_birth",
                "Tasks killed at birth past their session's share of the kernel's maps (fail \
                 closed), over all sessions",
                Number::UInt(kernel.totals.tasks_killed_at_birth),
            ),
            Family::counter(
                "tasks_escaped",
                "Tasks the kernel side could not follow at all (full maps), which may have \
                 outlived their session, over all sessions",
                Number::UInt(kernel.totals.tasks_escaped),
            ),
            Family::counter(
                "events_dropped",
                "Event-stream bytes dropped because a client did not read them",
                load(&c.events_dropped_bytes),
            )
            .unit(Unit::Bytes),
            Family::gauge(
                "hooks_attached",
                "1 while the kernel hooks are attached (a session is open), 0 while idle",
                Number::UInt(u64::from(state.hooks_attached())),
            ),
        ];
        // Not measured until the hooks were attached once: no sample rather than a made-up 0.
        let attach_ns = c.hooks_attach_ns_last.load(Ordering::Relaxed);
        if attach_ns > 0 {
            families.push(
                Family::gauge(
                    "hooks_attach_last",
                    "How long the last attach of the hooks took",
                    Number::Float(attach_ns as f64 / 1e9),
                )
                .unit(Unit::Seconds),
            );
        }
        let mut entries =
            Family::gauges("map_entries", "Entries in the kernel's membership maps now");
        let mut capacity =
            Family::gauges("map_capacity", "Capacity of the kernel's membership maps");
        for &(map, used, cap) in &kernel.fill {
            entries.push(vec![("map", map.to_string())], Number::UInt(used as u64));
            capacity.push(vec![("map", map.to_string())], Number::UInt(u64::from(cap)));
        }
        families.extend([entries, capacity]);
        if let Some(programs) = &kernel.programs {
            let mut run_time = Family::counters(
                "handler_run_time",
                "Kernel run time of each eBPF program (BPF_ENABLE_STATS; serve --bpf-stats)",
            )
            .unit(Unit::Seconds);
            let mut calls = Family::counters(
                "handler_calls",
                "Calls of each eBPF program (BPF_ENABLE_STATS; serve --bpf-stats)",
            );
            for (name, ns, count) in programs {
                let labels = vec![("program", name.clone())];
                run_time.push(labels.clone(), Number::Float(*ns as f64 / 1e9));
                calls.push(labels, Number::UInt(*count));
            }
            families.extend([run_time, calls]);
        }
        let mut limits = Family::counters(
            "clients_refused",
            "Clients refused or cut off by the daemon, by the limit that said so",
        );
        for (limit, n) in Limit::ALL.iter().zip(&c.refused) {
            limits.push(vec![("limit", limit.name().to_string())], load(n));
        }
        families.push(limits);
        let seats = self.seats().total;
        families.push(Family::gauge(
            "scrapes_active",
            "Connections to this metrics endpoint being served now",
            Number::UInt(seats as u64),
        ));
        let mut refused = Family::counters(
            "scrapes_refused",
            "Connections to this metrics endpoint refused at once, by the limit they hit \
             (total: 64 served at once; per_peer: 8 from one address)",
        );
        refused.push(
            vec![("limit", "total".to_string())],
            load(&self.refused_total),
        );
        refused.push(
            vec![("limit", "per_peer".to_string())],
            load(&self.refused_per_peer),
        );
        families.push(refused);
        families.push(Family::counter(
            "scrapes_timed_out",
            "Connections to this metrics endpoint closed at their 5 s deadline, unanswered or \
             not fully read",
            load(&self.timed_out),
        ));
        families
    }
}

/// Answers a connection past a limit with `503` if its socket takes it without waiting, and
/// closes it: nothing is queued behind slow clients.
fn refuse(mut stream: TcpStream, limit: SeatLimit) {
    let why = match limit {
        SeatLimit::Total => format!("{MAX_SCRAPES} scrapes are being served: try again\n"),
        SeatLimit::PerPeer => {
            format!(
                "{MAX_SCRAPES_PER_PEER} scrapes from your address are being served: try again\n"
            )
        }
    };
    let bytes = Response::plain("503 Service Unavailable", &why)
        .header("Retry-After", "1")
        .bytes(false);
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    // A fresh socket's send buffer takes a few hundred bytes at once.
    let _ = stream.write(&bytes);
    let _ = stream.shutdown(Shutdown::Write);
    // Whatever request already arrived is read, so that the close is not a reset that makes
    // the client lose the answer.
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// What the head reader got.
enum Head {
    /// Up to and including the blank line.
    Complete(Vec<u8>),
    /// [`MAX_HEAD`] bytes and still no blank line.
    TooLarge,
    /// The client closed first.
    Closed,
}

/// The time left before `deadline`, or a `TimedOut` error.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// Reads a request head, every read bounded by the time left before `deadline`.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let room = (MAX_HEAD - head.len()).min(buf.len());
        let n = match stream.read(&mut buf[..room]) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head_end(&head[from..]) {
            head.truncate(from + end);
            return Ok(Head::Complete(head));
        }
        if head.len() >= MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head in `bytes` ends (after its blank line: `\r\n\r\n`, or `\n\n`).
fn head_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        let rest = &bytes[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Writes all of `bytes`, every write bounded by the time left before `deadline`.
fn write_all_by(
    stream: &mut TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Ends the exchange: the answer is followed by a FIN, and what the client still sends is
/// read (up to 64 KiB, for [`LINGER`] at most and never past `deadline`) until it closes.
fn linger(stream: &mut TcpStream, deadline: Instant) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = deadline.min(Instant::now() + LINGER);
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        let Ok(left) = left(deadline) else { return };
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            return;
        }
    }
}

/// The parts of a request the endpoint looks at.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// The request target as sent (`/metrics`, `/metrics?x=y`).
    path: String,
    /// Every `Accept` header, joined with commas.
    accept: Option<String>,
}

impl Request {
    /// Parses a head; `None` when its request line is not `METHOD TARGET HTTP/1.x`.
    fn parse(head: &[u8]) -> Option<Request> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let mut parts = lines.next()?.split(' ').filter(|p| !p.is_empty());
        let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !version.starts_with("HTTP/1.") {
            return None;
        }
        let accepts: Vec<&str> = lines
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
            .map(|(_, value)| value.trim())
            .collect();
        Some(Request {
            method: method.to_string(),
            path: path.to_string(),
            accept: (!accepts.is_empty()).then(|| accepts.join(",")),
        })
    }
}

/// An answer, before it is made bytes.
struct Response {
    status: &'static str,
    content_type: &'static str,
    extra: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

impl Response {
    fn plain(status: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra.push((name, value));
        self
    }

    /// The answer on the wire; for `HEAD`, the same head without the body.
    fn bytes(self, head_only: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The exposition formats served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// OpenMetrics 1.0.0.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4.
    Text004,
}

/// The format an `Accept` header asks for, chosen as the Prometheus client libraries choose
/// it: the media ranges by preference (`q`, then the more specific first), the first that
/// names a format served wins; OpenMetrics (version 1.0.0, 0.0.1 or none) only when asked
/// for by name; text 0.0.4 otherwise (`text/plain` with version 0.0.4 or none, a wildcard,
/// nothing acceptable, or no header).
pub(crate) fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text004;
    };
    let mut ranges: Vec<(f32, usize, String, Option<String>)> = Vec::new();
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        if media.is_empty() {
            continue;
        }
        let (mut q, mut version) = (1.0f32, None);
        for param in params {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => q = value.parse().unwrap_or(1.0),
                "version" => version = Some(value.to_string()),
                _ => {}
            }
        }
        if q <= 0.0 || q.is_nan() {
            continue;
        }
        let wildcards = media.matches('*').count();
        ranges.push((q, wildcards, media, version));
    }
    // Stable: equal preferences keep the client's order.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, _, media, version) in ranges {
        let version = version.as_deref();
        match media.as_str() {
            "application/openmetrics-text" if matches!(version, None | Some("1.0.0" | "0.0.1")) => {
                return Format::OpenMetrics;
            }
            "text/plain" if matches!(version, None | Some("0.0.4")) => return Format::Text004,
            "*/*" | "text/*" => return Format::Text004,
            _ => {}
        }
    }
    Format::Text004
}

/// Whether a family counts up (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    UInt(u64),
    Float(f64),
}

/// One metric family, as both formats are rendered from it.
#[derive(Debug, Clone)]
pub(crate) struct Family {
    /// Without the `cylo_usage_` prefix, the unit or `_total`.
    pub name: &'static str,
    /// One line, without the final period (both renderings add it).
    pub help: &'static str,
    /// A base unit, appended to the name (`_seconds`, `_bytes`).
    pub unit: Option<Unit>,
    pub kind: Kind,
    /// (labels, value); a family without samples is not rendered.
    pub samples: Vec<(Vec<(&'static str, String)>, Number)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            unit: None,
            kind,
            samples: Vec::new(),
        }
    }

    fn counters(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Counter)
    }

    fn gauges(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Gauge)
    }

    fn counter(name: &'static str, help: &'static str, value: Number) -> Family {
        let mut f = Family::counters(name, help);
        f.push(Vec::new(), value);
        f
    }

    fn gauge(name: &'static str, help: &'static str, value: Number) -> Family {
        let mut f = Family::gauges(name, help);
        f.push(Vec::new(), value);
        f
    }

    fn unit(mut self, unit: Unit) -> Family {
        self.unit = Some(unit);
        self
    }

    fn push(&mut self, labels: Vec<(&'static str, String)>, value: Number) {
        self.samples.push((labels, value));
    }

    /// The name its TYPE line gives: prefix, name and unit (OpenMetrics' family name).
    fn base_name(&self) -> String {
        let mut name = format!("cylo_usage_{}", self.name);
        if let Some(unit) = &self.unit {
            name.push('_');
            name.push_str(unit.as_str());
        }
        name
    }
}

/// The families in OpenMetrics 1.0.0, by `prometheus-client`.
pub(crate) fn openmetrics(families: Vec<Family>) -> String {
    let mut registry = Registry::with_prefix("cylo_usage");
    registry.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    // Writing to a String cannot fail, and every name and value here is valid.
    let _ = encode(&mut out, &registry);
    out
}

/// The families as a `prometheus-client` collector.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.0.iter().filter(|f| !f.samples.is_empty()) {
            let help = format!("{}.", family.help);
            let kind = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric =
                encoder.encode_descriptor(family.name, &help, family.unit.as_ref(), kind)?;
            match family.samples.as_slice() {
                [(labels, value)] if labels.is_empty() => {
                    encode_value(family.kind, *value, metric)?;
                }
                samples => {
                    for (labels, value) in samples {
                        // prometheus-client writes label values as they are: escaped here.
                        let labels: Vec<(&str, String)> = labels
                            .iter()
                            .map(|(key, value)| (*key, escape_label_value(value)))
                            .collect();
                        encode_value(family.kind, *value, metric.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: Kind,
    value: Number,
    encoder: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (Kind::Counter, Number::UInt(v)) => ConstCounter::new(v).encode(encoder),
        (Kind::Counter, Number::Float(v)) => ConstCounter::new(v).encode(encoder),
        (Kind::Gauge, Number::UInt(v)) => {
            ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(encoder)
        }
        (Kind::Gauge, Number::Float(v)) => ConstGauge::new(v).encode(encoder),
    }
}

/// The families in the classic text exposition format 0.0.4: a counter's HELP, TYPE and
/// sample all name `..._total`; no UNIT lines, no `_created`, no `# EOF`.
pub(crate) fn text_004(families: &[Family]) -> String {
    let mut out = String::new();
    for family in families.iter().filter(|f| !f.samples.is_empty()) {
        let mut name = family.base_name();
        let kind = match family.kind {
            Kind::Counter => {
                name.push_str("_total");
                "counter"
            }
            Kind::Gauge => "gauge",
        };
        let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in &family.samples {
            out.push_str(&name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (key, value)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{key}=\"{}\"", escape_label_value(value));
                }
                out.push('}');
            }
            let _ = match value {
                Number::UInt(v) => writeln!(out, " {v}"),
                Number::Float(v) if v.is_nan() => writeln!(out, " NaN"),
                Number::Float(v) if v.is_infinite() => {
                    writeln!(out, " {}", if *v > 0.0 { "+Inf" } else { "-Inf" })
                }
                Number::Float(v) => writeln!(out, " {v}"),
            };
        }
    }
    out
}

/// A label value as both formats quote it: `\\`, `\"` and `\n` escaped.
fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
