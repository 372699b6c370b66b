use super::*;

/// `d` as a bound on our own promptness: five times it in the kernel-matrix guests, whose
/// CPUs are emulated (as the integration tests' `common::bound`).
fn promptly(d: Duration) -> Duration {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        d * 5
    } else {
        d
    }
}

/// One family of each shape the endpoint serves, and an empty one.
fn families() -> Vec<Family> {
    let mut maps = Family::gauges("map_entries", "Entries now");
    maps.push(vec![("map", "TASKS".to_string())], Number::UInt(3));
    maps.push(vec![("map", "a\"b\\c\nd".to_string())], Number::UInt(4));
    let mut run_time = Family::counters("handler_run_time", "Run time").unit(Unit::Seconds);
    run_time.push(
        vec![("program", "sched_exit".to_string())],
        Number::Float(0.00125),
    );
    vec![
        Family::gauge("sessions_active", "Sessions open now", Number::UInt(2)),
        Family::counter("sessions", "Sessions opened", Number::UInt(7)),
        Family::counter("events_dropped", "Bytes dropped", Number::UInt(0)).unit(Unit::Bytes),
        Family::gauge("hooks_attach_last", "Attach time", Number::Float(0.0006))
            .unit(Unit::Seconds),
        maps,
        run_time,
        Family::counters("handler_calls", "Calls (none: no sample, no family)"),
    ]
}

#[test]
fn the_classic_text_format_names_counters_with_total_and_types_every_family() {
    let text = text_004(&families());
    let expected = "\
# HELP cylo_usage_sessions_active Sessions open now.
# TYPE cylo_usage_sessions_active gauge
cylo_usage_sessions_active 2
# HELP cylo_usage_sessions_total Sessions opened.
# TYPE cylo_usage_sessions_total counter
cylo_usage_sessions_total 7
# HELP cylo_usage_events_dropped_bytes_total Bytes dropped.
# TYPE cylo_usage_events_dropped_bytes_total counter
cylo_usage_events_dropped_bytes_total 0
# HELP cylo_usage_hooks_attach_last_seconds Attach time.
# TYPE cylo_usage_hooks_attach_last_seconds gauge
cylo_usage_hooks_attach_last_seconds 0.0006
# HELP cylo_usage_map_entries Entries now.
# TYPE cylo_usage_map_entries gauge
cylo_usage_map_entries{map=\"TASKS\"} 3
cylo_usage_map_entries{map=\"a\\\"b\\\\c\\nd\"} 4
# HELP cylo_usage_handler_run_time_seconds_total Run time.
# TYPE cylo_usage_handler_run_time_seconds_total counter
cylo_usage_handler_run_time_seconds_total{program=\"sched_exit\"} 0.00125
";
    assert_eq!(text, expected);
    assert_classic(&text);
}

/// What the issue found broken, checked with the classic parser: every family has its
/// TYPE and samples, and every sample a known type.
pub(crate) fn assert_classic(text: &str) {
    use prometheus_parse::{LineInfo, Scrape, Value};
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    assert!(!text.contains("_created"), "{text}");
    let typed: Vec<String> = text
        .lines()
        .filter_map(|l| match LineInfo::parse(l) {
            LineInfo::Type { metric_name, .. } => Some(metric_name),
            _ => None,
        })
        .collect();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(!scrape.samples.is_empty());
    for name in &typed {
        assert!(
            scrape.samples.iter().any(|s| &s.metric == name),
            "family {name} has no sample: {text}"
        );
        assert!(scrape.docs.contains_key(name), "family {name} has no HELP");
    }
    for s in &scrape.samples {
        assert!(
            !matches!(s.value, Value::Untyped(_)),
            "sample {} has no TYPE: {text}",
            s.metric
        );
        assert!(typed.contains(&s.metric), "{} is not typed", s.metric);
    }
    let sessions = scrape
        .samples
        .iter()
        .find(|s| s.metric.ends_with("sessions_total"));
    assert!(sessions.is_none_or(|s| matches!(s.value, Value::Counter(_))));
}

#[test]
fn openmetrics_is_prometheus_clients_rendering_of_the_same_values() {
    let text = openmetrics(families());
    let expected = "\
# HELP cylo_usage_sessions_active Sessions open now.
# TYPE cylo_usage_sessions_active gauge
cylo_usage_sessions_active 2
# HELP cylo_usage_sessions Sessions opened.
# TYPE cylo_usage_sessions counter
cylo_usage_sessions_total 7
# HELP cylo_usage_events_dropped_bytes Bytes dropped.
# TYPE cylo_usage_events_dropped_bytes counter
# UNIT cylo_usage_events_dropped_bytes bytes
cylo_usage_events_dropped_bytes_total 0
# HELP cylo_usage_hooks_attach_last_seconds Attach time.
# TYPE cylo_usage_hooks_attach_last_seconds gauge
# UNIT cylo_usage_hooks_attach_last_seconds seconds
cylo_usage_hooks_attach_last_seconds 0.0006
# HELP cylo_usage_map_entries Entries now.
# TYPE cylo_usage_map_entries gauge
cylo_usage_map_entries{map=\"TASKS\"} 3
cylo_usage_map_entries{map=\"a\\\"b\\\\c\\nd\"} 4
# HELP cylo_usage_handler_run_time_seconds Run time.
# TYPE cylo_usage_handler_run_time_seconds counter
# UNIT cylo_usage_handler_run_time_seconds seconds
cylo_usage_handler_run_time_seconds_total{program=\"sched_exit\"} 0.00125
# EOF
";
    assert_eq!(text, expected);
}

#[test]
fn accept_picks_openmetrics_only_when_preferred() {
    use Format::*;
    let cases = [
        (None, Text004),
        (Some(""), Text004),
        (Some("*/*"), Text004),
        (Some("text/plain"), Text004),
        (Some("text/plain;version=0.0.4"), Text004),
        (Some("text/plain; version=0.0.4; charset=utf-8"), Text004),
        (Some("application/openmetrics-text"), OpenMetrics),
        (
            Some("Application/OpenMetrics-Text; Version=1.0.0"),
            OpenMetrics,
        ),
        (
            Some("application/openmetrics-text;version=0.0.1"),
            OpenMetrics,
        ),
        // A version not served is not a match; nothing else acceptable: the default.
        (Some("application/openmetrics-text;version=2.0.0"), Text004),
        (Some("application/openmetrics-text;q=0"), Text004),
        (
            Some("text/plain;q=0.5, application/openmetrics-text;q=0.9"),
            OpenMetrics,
        ),
        (
            Some("application/openmetrics-text;q=0.4,text/plain;version=0.0.4;q=0.5"),
            Text004,
        ),
        // Equal preference: the specific range before the wildcard.
        (Some("*/*, application/openmetrics-text"), OpenMetrics),
        (Some("application/json, text/html"), Text004),
        // Prometheus 2.x and 3.x.
        (
            Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                     version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            ),
            OpenMetrics,
        ),
        (
            Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
                     application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;\
                     escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
            ),
            OpenMetrics,
        ),
        // Prometheus with the classic format forced (scrape_protocols).
        (Some("text/plain;version=0.0.4;q=0.9,*/*;q=0.1"), Text004),
    ];
    for (accept, format) in cases {
        assert_eq!(negotiate(accept), format, "Accept: {accept:?}");
    }
}

#[test]
fn request_heads_are_parsed_or_refused() {
    let r = Request::parse(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\naccept: text/plain\r\nAccept: */*;q=0.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, "/metrics");
    assert_eq!(r.accept.as_deref(), Some("text/plain,*/*;q=0.1"));
    let r = Request::parse(b"HEAD /metrics?x=1 HTTP/1.0\n\n").unwrap();
    assert_eq!((r.method.as_str(), r.accept), ("HEAD", None));
    for bad in [
        &b"\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
    ] {
        assert_eq!(
            Request::parse(bad),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
    assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
    assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
}

/// A connected pair of loopback TCP streams: (client, server).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (client, listener.accept().unwrap().0)
}

#[test]
fn one_deadline_bounds_a_head_trickled_faster_than_any_read_timeout() {
    let (mut client, mut server) = tcp_pair();
    let dripping = std::thread::spawn(move || {
        for &b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
            if client.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let start = Instant::now();
    let deadline = start + Duration::from_millis(400);
    let err = read_head(&mut server, deadline).err().expect("a timeout");
    assert!(is_timeout(&err), "{err}");
    // Each byte came well within any per-read timeout; the whole took the deadline.
    assert!(
        start.elapsed() < promptly(Duration::from_secs(2)),
        "{:?}",
        start.elapsed()
    );
    drop(server);
    dripping.join().unwrap();
}

#[test]
fn one_deadline_bounds_an_answer_that_is_not_read() {
    let (client, mut server) = tcp_pair();
    // More than any socket buffer holds, to a client that reads nothing.
    let answer = vec![b'x'; 64 << 20];
    let start = Instant::now();
    let err = write_all_by(&mut server, &answer, start + Duration::from_millis(400))
        .expect_err("a timeout");
    assert!(is_timeout(&err), "{err}");
    assert!(
        start.elapsed() < promptly(Duration::from_secs(2)),
        "{:?}",
        start.elapsed()
    );
    drop(client);
}

#[test]
fn a_head_past_the_limit_is_too_large_and_a_close_is_a_close() {
    let (mut client, mut server) = tcp_pair();
    client.write_all(&vec![b'a'; MAX_HEAD + 10]).unwrap();
    let head = read_head(&mut server, Instant::now() + DEADLINE).unwrap();
    assert!(matches!(head, Head::TooLarge));
    let (mut client, mut server) = tcp_pair();
    client.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
    drop(client);
    let head = read_head(&mut server, Instant::now() + DEADLINE).unwrap();
    assert!(matches!(head, Head::Closed));
}

#[test]
fn head_answers_carry_the_get_headers_without_the_body() {
    let get = Response::plain("200 OK", "body\n").bytes(false);
    let head = Response::plain("200 OK", "body\n").bytes(true);
    assert!(get.starts_with(&head));
    assert_eq!(&get[head.len()..], b"body\n");
    let head = String::from_utf8(head).unwrap();
    assert!(head.contains("Content-Length: 5\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"));
}
