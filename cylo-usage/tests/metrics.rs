//! `cylo-usage serve --metrics ADDR`, scraped over raw TCP the way Prometheus does and the
//! way a hostile local user would: trickling a request, holding idle connections past the
//! caps, asking for either exposition format, sending HEAD and other methods.
//!
//! The tests of this file run one at a time: each counts on its own daemon's 5 s scrape
//! deadline, which a host busy starting other daemons would blur.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::bound;
use common::daemon::privileged;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The endpoint's documented limits (src/daemon/metrics.rs).
const DEADLINE: Duration = Duration::from_secs(5);
const MAX_SCRAPES: usize = 64;
const MAX_SCRAPES_PER_PEER: usize = 8;

const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A daemon serving metrics on a free port of 127.0.0.1.
struct Daemon {
    daemon: common::daemon::Daemon,
    metrics: SocketAddr,
}

impl Daemon {
    fn start(name: &str, args: &[&str]) -> Daemon {
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let addr = metrics.to_string();
        let mut all = vec!["--metrics", &addr];
        all.extend_from_slice(args);
        // The metrics endpoint is bound before the socket listens.
        Daemon {
            daemon: common::daemon::Daemon::start(&format!("metrics-{name}"), &all),
            metrics,
        }
    }
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8): another
/// "host" as the endpoint's per-peer cap sees it.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    let SocketAddr::V4(to) = to else {
        panic!("{to} is not IPv4")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the TcpStream below (or closed on error).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours; from here the TcpStream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sockaddr(SocketAddrV4::new(from, 0));
    let remote = sockaddr(to);
    // SAFETY: valid sockaddr_in values of the length given.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// An answer: the status line and headers, the body, and how long it took.
struct Answer {
    head: String,
    body: Vec<u8>,
    took: Duration,
}

impl Answer {
    fn status(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Sends `request` on `stream` and reads the answer to the end. The client gives up after
/// 20 s, so that a hang is a failure and not a stuck test. `None` when the endpoint closed
/// (or reset) the connection without a word.
fn exchange_on(mut stream: TcpStream, request: &[u8]) -> Option<Answer> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer (and no close) in 20 s: {e}"),
    }
    let took = start.elapsed();
    if bytes.is_empty() {
        return None;
    }
    let at = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&bytes)));
    Some(Answer {
        head: String::from_utf8(bytes[..at].to_vec()).unwrap(),
        body: bytes[at + 4..].to_vec(),
        took,
    })
}

fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Answer> {
    exchange_on(TcpStream::connect(addr).unwrap(), request)
}

/// `GET /metrics`, with `accept` as the Accept header if given.
fn get(addr: SocketAddr, accept: Option<&str>) -> Answer {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: test\r\n{accept}\r\n");
    exchange(addr, request.as_bytes()).expect("an answer to GET /metrics")
}

/// A scrape that must be answered, in full, within 2 s.
fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let a = get(addr, None);
    assert!(a.status().starts_with("HTTP/1.1 200"), "{}", a.head);
    assert!(
        a.took < bound(Duration::from_secs(2)),
        "the scrape took {:?}",
        a.took
    );
    classic(a.text())
}

/// Parses the classic text format, checking what the issue found broken: every family has
/// its TYPE and at least one sample, and every sample a known type.
fn classic(text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::{LineInfo, Scrape, Value};
    assert!(!text.contains("# EOF"), "{text}");
    assert!(!text.contains("# UNIT"), "{text}");
    assert!(!text.contains("_created"), "{text}");
    let typed: Vec<String> = text
        .lines()
        .filter_map(|l| match LineInfo::parse(l) {
            LineInfo::Type { metric_name, .. } => Some(metric_name),
            _ => None,
        })
        .collect();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(!typed.is_empty(), "{text}");
    for name in &typed {
        assert!(
            scrape.samples.iter().any(|s| &s.metric == name),
            "family {name} has no sample:\n{text}"
        );
        assert!(scrape.docs.contains_key(name), "{name} has no HELP");
    }
    for s in &scrape.samples {
        assert!(
            matches!(s.value, Value::Counter(_) | Value::Gauge(_)),
            "{} has no known type:\n{text}",
            s.metric
        );
    }
    scrape
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

/// Whether the endpoint has closed `stream` (EOF or reset) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_trickling_client_delays_no_scrape_and_is_cut_at_the_deadline() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("trickle", &[]);
    let addr = daemon.metrics;
    // One byte every 2 s: no read ever waits 5 s, so only a deadline for the whole exchange
    // ends this connection (a per-read timeout would keep it for 2 s × 8 KiB: 4.5 hours).
    let trickler = TcpStream::connect(addr).unwrap();
    let opened = Instant::now();
    let mut writer = trickler.try_clone().unwrap();
    let dripping = std::thread::spawn(move || {
        for &b in b"GET /metrics HTTP/1.1\r\nHost: slow\r\n".iter() {
            if writer.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    // Meanwhile, scrapes are answered, each within 2 s.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let s = scrape(addr);
        assert_eq!(value(&s, "cylo_usage_sessions_active", None), 0.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        opened.elapsed() < DEADLINE,
        "the scrapes ran after the trickler's deadline: they proved nothing"
    );
    // The trickler is closed at its deadline (5 s), unanswered; generous bound: 15 s.
    let mut reader = trickler;
    assert!(
        closed_within(&mut reader, bound(Duration::from_secs(15))),
        "the trickling connection was still open after {:?}",
        opened.elapsed()
    );
    let cut_after = opened.elapsed();
    assert!(
        cut_after >= DEADLINE - Duration::from_millis(500),
        "{cut_after:?}"
    );
    dripping.join().unwrap();
    let s = scrape(addr);
    assert!(value(&s, "cylo_usage_scrapes_timed_out_total", None) >= 1.0);
    eprintln!("the trickler was cut after {cut_after:?}");
}

#[test]
fn idle_connections_past_the_caps_are_refused_at_once_and_cost_no_scrape() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("idle", &[]);
    let addr = daemon.metrics;
    let peer = |n: u8| Ipv4Addr::new(127, 0, 0, n);
    let opened = Instant::now();
    // Seven "hosts" (127.0.0.2..=8) each hold their share of idle connections, saying nothing.
    let mut idle: Vec<TcpStream> = Vec::new();
    for host in 2..=8 {
        for _ in 0..MAX_SCRAPES_PER_PEER {
            idle.push(connect_from(peer(host), addr).unwrap());
        }
    }
    // One connection more from 127.0.0.2 is refused at once.
    let extra = connect_from(peer(2), addr).unwrap();
    let refused = exchange_on(extra, b"GET /metrics HTTP/1.1\r\n\r\n");
    check_refused(refused.as_ref(), "per-peer");
    // Another address is still served, at once.
    let s = scrape(addr);
    assert_eq!(
        value(&s, "cylo_usage_scrapes_active", None),
        (7 * MAX_SCRAPES_PER_PEER + 1) as f64
    );
    // An eighth host fills the endpoint (64 connections)...
    for _ in 0..MAX_SCRAPES - 7 * MAX_SCRAPES_PER_PEER {
        idle.push(connect_from(peer(9), addr).unwrap());
    }
    // ... so a scrape from anywhere is refused at once, never queued behind the idle ones.
    std::thread::sleep(Duration::from_millis(200));
    let refused = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    check_refused(refused.as_ref(), "total");
    assert!(
        opened.elapsed() < DEADLINE,
        "the refusals were checked after the idle connections' deadline: they proved nothing"
    );
    // Closing some idle ones frees their seats: scrapes are served again.
    idle.truncate(7 * MAX_SCRAPES_PER_PEER);
    let deadline = Instant::now() + bound(Duration::from_secs(2));
    loop {
        let a = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        if a.as_ref()
            .is_some_and(|a| a.status().starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no seat freed: {:?}",
            a.map(|a| a.head)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The idle connections themselves end at their deadline.
    for s in &mut idle {
        assert!(
            closed_within(s, bound(Duration::from_secs(15))),
            "an idle connection was still open after {:?}",
            opened.elapsed()
        );
    }
    let s = scrape(addr);
    assert!(
        value(
            &s,
            "cylo_usage_scrapes_refused_total",
            Some(("limit", "per_peer"))
        ) >= 1.0
    );
    assert!(
        value(
            &s,
            "cylo_usage_scrapes_refused_total",
            Some(("limit", "total"))
        ) >= 1.0
    );
    // Only this scrape is served once the closed connections' threads have ended (each may
    // still wait up to 1 s for its client to close first).
    let deadline = Instant::now() + bound(Duration::from_secs(5));
    loop {
        let active = value(&scrape(addr), "cylo_usage_scrapes_active", None);
        if active == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{active} scrapes still active");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A refusal is immediate (within 2 s) and says 503 with a reason, or is a bare close.
fn check_refused(answer: Option<&Answer>, limit: &str) {
    if let Some(a) = answer {
        assert!(
            a.status().starts_with("HTTP/1.1 503"),
            "{limit}: {}",
            a.head
        );
        assert!(
            a.took < bound(Duration::from_secs(2)),
            "{limit}: {:?}",
            a.took
        );
        assert!(a.text().contains("try again"), "{}", a.text());
    }
}

#[test]
fn accept_chooses_openmetrics_or_the_classic_text_format() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("accept", &["--bpf-stats"]);
    let addr = daemon.metrics;
    // One session, so that the hooks were attached once and the programs ran.
    let tracker = cylo_usage::Tracker::connect(&daemon.daemon.socket).unwrap();
    let run = tracker.spawn(&mut Command::new("/bin/true")).unwrap();
    drop(run);

    // The classic format: for no Accept, for text/plain 0.0.4 and for wildcards.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let a = get(addr, accept);
        assert!(a.status().starts_with("HTTP/1.1 200"), "{}", a.head);
        assert_eq!(a.header("Content-Type"), Some(TEXT_004), "{accept:?}");
        assert_eq!(a.header("Vary"), Some("Accept"));
        let s = classic(a.text());
        assert!(value(&s, "cylo_usage_sessions_total", None) >= 1.0);
        let attach = value(&s, "cylo_usage_hooks_attach_last_seconds", None);
        assert!(attach > 0.0 && attach < 10.0, "{attach} s");
        assert!(
            s.samples
                .iter()
                .any(|x| x.metric == "cylo_usage_handler_run_time_seconds_total"),
            "{}",
            a.text()
        );
        assert!(!a.text().contains("nanoseconds"), "{}", a.text());
    }

    // OpenMetrics, for Prometheus' own Accept and for a plain request of it.
    for accept in [PROMETHEUS_ACCEPT, "application/openmetrics-text"] {
        let a = get(addr, Some(accept));
        assert!(a.status().starts_with("HTTP/1.1 200"), "{}", a.head);
        assert_eq!(a.header("Content-Type"), Some(OPENMETRICS), "{accept}");
        let text = a.text();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE cylo_usage_sessions counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT cylo_usage_hooks_attach_last_seconds seconds\n"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT cylo_usage_handler_run_time_seconds seconds\n"),
            "{text}"
        );
        // Every family has samples of its own name (`_total` for counters).
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = l.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            let sample = match kind {
                "counter" => format!("{name}_total"),
                "gauge" => name.to_string(),
                other => panic!("type {other} in {l}"),
            };
            assert!(samples.contains(&sample.as_str()), "no {sample}:\n{text}");
        }
    }
}

#[test]
fn head_is_answered_and_other_methods_and_heads_are_refused() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("head", &[]);
    let addr = daemon.metrics;
    let get = get(addr, None);
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    assert!(head.status().starts_with("HTTP/1.1 200"), "{}", head.head);
    assert!(head.body.is_empty(), "HEAD has no body: {:?}", head.text());
    assert_eq!(head.header("Content-Type"), Some(TEXT_004));
    let length: usize = head.header("Content-Length").unwrap().parse().unwrap();
    // The same size as a GET's body (give or take the digits of values that moved).
    assert!(
        length.abs_diff(get.body.len()) < 64,
        "{length} vs {}",
        get.body.len()
    );
    let head = exchange(
        addr,
        format!("HEAD /metrics HTTP/1.1\r\nAccept: {PROMETHEUS_ACCEPT}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(head.header("Content-Type"), Some(OPENMETRICS));
    assert!(head.body.is_empty());

    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let a = exchange(
            addr,
            format!("{method} /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert!(
            a.status().starts_with("HTTP/1.1 405"),
            "{method}: {}",
            a.head
        );
        assert_eq!(a.header("Allow"), Some("GET, HEAD"), "{method}");
    }
    let a = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").unwrap();
    assert!(a.status().starts_with("HTTP/1.1 404"), "{}", a.head);
    let a = exchange(addr, b"nonsense\r\n\r\n").unwrap();
    assert!(a.status().starts_with("HTTP/1.1 400"), "{}", a.head);
    // A head past 8 KiB is refused at once, not read on.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    big.resize(9 << 10, b'a');
    let a = exchange(addr, &big).unwrap();
    assert!(a.status().starts_with("HTTP/1.1 431"), "{}", a.head);
    assert!(a.took < bound(Duration::from_secs(2)), "{:?}", a.took);
    // And the endpoint still serves.
    scrape(addr);
}

/// What sessions failed to follow is in the metrics: a session at its share kills tasks at
/// birth, and the counter says exactly as many as the session's report, after it ended.
#[test]
fn tasks_killed_at_birth_are_counted_in_the_metrics() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start("killed", &["--session-max-tasks", "8"]);
    let before = scrape(d.metrics);
    assert_eq!(
        value(&before, "cylo_usage_tasks_killed_at_birth_total", None),
        0.0
    );
    assert_eq!(value(&before, "cylo_usage_tasks_escaped_total", None), 0.0);
    let out = d
        .daemon
        .client(&["run", "--json", "--"])
        .args([common::WORKLOAD, "fork", "100"])
        .output()
        .unwrap();
    let u = common::daemon::json(&out);
    assert_eq!(u["tracker"], "daemon", "{u}");
    let killed = u["tasks_killed_at_birth"].as_u64().unwrap();
    assert!(killed >= 1, "{u}");
    let after = scrape(d.metrics);
    assert_eq!(
        value(&after, "cylo_usage_tasks_killed_at_birth_total", None),
        killed as f64,
        "{u}"
    );
    assert_eq!(value(&after, "cylo_usage_tasks_escaped_total", None), 0.0);
}
