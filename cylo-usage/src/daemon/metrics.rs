//! `serve --metrics ADDR`: the daemon's state in the OpenMetrics text format
//! (`prometheus-client`), over plain HTTP (`GET /metrics`), for a fleet's Prometheus.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::DaemonError;
use super::server::State;

/// The largest request head read.
const MAX_HEAD: usize = 8 << 10;

/// Binds `addr` and serves scrapes on a thread of their own.
pub(crate) fn start(addr: SocketAddr, state: Arc<State>) -> Result<(), DaemonError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| DaemonError::Metrics { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".to_string())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer(stream, &state);
            }
        })
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    Ok(())
}

fn answer(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(state),
        )
    } else {
        ("404 Not Found", "text/plain", "see /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// The metrics as they are now.
pub(crate) fn render(state: &State) -> String {
    let c = &state.counters;
    let mut registry = Registry::with_prefix("cylo_usage");
    let gauge = |registry: &mut Registry, name: &str, help: &str, v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, v: u64| {
        let k: Counter = Counter::default();
        k.inc_by(v);
        registry.register(name, help, k);
    };
    let (active, connections) = state.sessions_and_connections();
    gauge(
        &mut registry,
        "sessions_active",
        "Sessions open now",
        active as i64,
    );
    gauge(
        &mut registry,
        "connections_active",
        "Client connections open now",
        connections as i64,
    );
    counter(
        &mut registry,
        "sessions",
        "Sessions opened since the daemon started",
        c.sessions_total.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "sessions_refused",
        "Sessions refused by the per-user limit",
        c.sessions_refused.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "connections",
        "Client connections accepted",
        c.connections_total.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "requests",
        "Requests received",
        c.requests_total.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "bad_requests",
        "Requests refused as malformed",
        c.bad_requests_total.load(Ordering::Relaxed),
    );
    let (lost_live, fill) = state.kernel_state();
    counter(
        &mut registry,
        "lost_events",
        "Records the kernel side could not make (a map or ring buffer full), over all sessions",
        c.lost_events_ended.load(Ordering::Relaxed) + lost_live,
    );
    counter(
        &mut registry,
        "events_dropped_bytes",
        "Event-stream bytes dropped because a client did not read them",
        c.events_dropped_bytes.load(Ordering::Relaxed),
    );
    gauge(
        &mut registry,
        "hooks_attached",
        "1 while the kernel hooks are attached (a session is open), 0 while idle",
        i64::from(state.tracker.hooks_attached()),
    );
    gauge(
        &mut registry,
        "hooks_attach_last_nanoseconds",
        "How long the last re-attach of the hooks took",
        c.hooks_attach_ns_last.load(Ordering::Relaxed) as i64,
    );
    let entries: Family<Vec<(String, String)>, Gauge> = Family::default();
    let capacity: Family<Vec<(String, String)>, Gauge> = Family::default();
    for (map, used, cap) in fill {
        let labels = vec![("map".to_string(), map.to_string())];
        entries.get_or_create(&labels).set(used as i64);
        capacity.get_or_create(&labels).set(cap as i64);
    }
    registry.register(
        "map_entries",
        "Entries in the kernel's membership maps now",
        entries,
    );
    registry.register(
        "map_capacity",
        "Capacity of the kernel's membership maps",
        capacity,
    );
    if state.bpf_stats() {
        let run_time: Family<Vec<(String, String)>, Counter> = Family::default();
        let calls: Family<Vec<(String, String)>, Counter> = Family::default();
        for (name, ns, count) in state.tracker.program_stats() {
            let labels = vec![("program".to_string(), name)];
            run_time.get_or_create(&labels).inc_by(ns);
            calls.get_or_create(&labels).inc_by(count);
        }
        registry.register(
            "handler_run_time_nanoseconds",
            "Kernel run time of each eBPF program (BPF_ENABLE_STATS; serve --bpf-stats)",
            run_time,
        );
        registry.register(
            "handler_calls",
            "Calls of each eBPF program (BPF_ENABLE_STATS; serve --bpf-stats)",
            calls,
        );
    }
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out
}
