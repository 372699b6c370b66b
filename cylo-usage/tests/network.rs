//! Socket bytes, over loopback, against byte counts the workload knows: both ends in the
//! tree unless a test says otherwise, so every byte sent is received too.
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};

use common::{CLI, WORKLOAD, kernel_version, network_hooks, run_to_end, tracker, workload};
use cylo_usage::NetworkUsage;
use cylo_usage::features::NetworkPath;
use cylo_usage::{ResourceUsage, Tracker};

const MIB: u64 = 1 << 20;

/// Bytes per kind, (sent, received).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Want {
    tcp: (u64, u64),
    udp: (u64, u64),
    unix: (u64, u64),
}

/// The tracker, where the kernel has hooks for socket bytes ([`network_hooks`]); where it has
/// none, the tracker must say the network is unmeasured, and the test skips.
fn net_tracker() -> Option<Tracker> {
    let t = tracker()?;
    if network_hooks() {
        return Some(t);
    }
    assert_eq!(t.measured().network, None, "{:?}", t.features());
    eprintln!("SKIPPED: this kernel has no hooks for socket bytes (arm64 before 6.3)");
    None
}

fn network(u: &ResourceUsage) -> &NetworkUsage {
    u.network
        .as_ref()
        .unwrap_or_else(|| panic!("the network is measured on every kernel of the matrix: {u:?}"))
}

/// Checks every socket counter of `u` exactly: the kinds, the inet totals (TCP + UDP, not
/// AF_UNIX), and `other` (0 where the kernel path sees it, else null).
fn check(t: &Tracker, u: &ResourceUsage, want: Want) {
    let n = network(u);
    let got = Want {
        tcp: (n.tcp_sent, n.tcp_received),
        udp: (n.udp_sent, n.udp_received),
        unix: (n.unix_sent, n.unix_received),
    };
    assert_eq!(got, want, "{u:?}");
    assert_eq!(u.network_bytes_sent, Some(want.tcp.0 + want.udp.0), "{u:?}");
    assert_eq!(
        u.network_bytes_received,
        Some(want.tcp.1 + want.udp.1),
        "{u:?}"
    );
    let other = sees_other(t).then_some(0);
    assert_eq!((n.other_sent, n.other_received), (other, other), "{u:?}");
}

fn sees_other(t: &Tracker) -> bool {
    t.measured().network.is_some_and(NetworkPath::sees_other)
}

fn both(n: u64) -> (u64, u64) {
    (n, n)
}

async fn run_net(t: &Tracker, args: &[&str]) -> ResourceUsage {
    let mut full = vec!["net"];
    full.extend_from_slice(args);
    run_to_end(t, &mut workload(&full)).await
}

#[tokio::test]
async fn the_kernel_path_is_the_one_its_btf_offers() {
    let Some(t) = net_tracker() else { return };
    let path = t.measured().network;
    let v = kernel_version();
    // The tracepoints came with 6.3; sendpage went with 6.5.
    let want = if v >= (6, 5) {
        NetworkPath::Tracepoints { sendpage: false }
    } else if v >= (6, 3) {
        NetworkPath::Tracepoints { sendpage: true }
    } else {
        NetworkPath::Functions { sendpage: true }
    };
    assert_eq!(path, Some(want), "{:?}", t.features());
    for f in t.features() {
        if f.counter.starts_with("network") && f.counter != "network.other" {
            assert!(f.measured, "{f:?}");
        }
    }
}

#[tokio::test]
async fn tcp_several_mib_both_ways() {
    let Some(t) = net_tracker() else { return };
    let (send, recv) = (3 * MIB + 5, 5 * MIB + 7);
    let u = run_net(&t, &["tcp", &send.to_string(), &recv.to_string()]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(send + recv),
            ..Want::default()
        },
    );
    assert_eq!(u.process_count, 2, "{u:?}");
}

#[tokio::test]
async fn tcp_over_ipv6() {
    let Some(t) = net_tracker() else { return };
    if TcpListener::bind("[::1]:0").is_err() {
        if common::ebpf_required() {
            panic!("CYLO_USAGE_REQUIRE_EBPF=1 but ::1 is not configured");
        }
        eprintln!("SKIPPED: ::1 is not configured here");
        return;
    }
    let u = run_net(&t, &["tcp", "1000000", "3000", "v6"]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(1_003_000),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn udp_datagrams() {
    let Some(t) = net_tracker() else { return };
    // 2,000 datagrams of 512 bytes, acknowledged every 64 and at the end: 32 one-byte acks.
    let u = run_net(&t, &["udp", "2000", "512", "64"]).await;
    check(
        &t,
        &u,
        Want {
            udp: both(2000 * 512 + 32),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn sendmmsg_and_recvmmsg_count_every_message() {
    let Some(t) = net_tracker() else { return };
    // 20 batches of 16 datagrams of 200 bytes, one 1-byte ack per batch. Each call moves 16
    // messages: the first through the checked path, the other 15 through the `_nosec` one.
    let u = run_net(&t, &["mmsg", "320", "200"]).await;
    check(
        &t,
        &u,
        Want {
            udp: both(320 * 200 + 20),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn af_unix_is_counted_apart_from_the_inet_totals() {
    let Some(t) = net_tracker() else { return };
    let u = run_net(&t, &["unix-stream", &MIB.to_string()]).await;
    check(
        &t,
        &u,
        Want {
            unix: both(2 * MIB),
            ..Want::default()
        },
    );
    for mode in ["unix-dgram", "seqpacket"] {
        let u = run_net(&t, &[mode, "500", "300"]).await;
        eprintln!("{mode}: {u:?}");
        check(
            &t,
            &u,
            Want {
                unix: both(150_000),
                ..Want::default()
            },
        );
    }
    // The human report shows AF_UNIX on its own line.
    let o = Command::new(CLI)
        .args(["run", "--", WORKLOAD, "net", "unix-stream", "1000"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("\tUnix socket bytes: 2000 sent, 2000 received\n"),
        "{text}"
    );
    assert!(text.contains("\tNetwork bytes sent: 0\n"), "{text}");
}

#[tokio::test]
async fn sendfile_of_a_file_into_tcp() {
    let Some(t) = net_tracker() else { return };
    let bytes = 4 * MIB + 123;
    let u = run_net(&t, &["sendfile", &bytes.to_string()]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(bytes),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn splice_into_tcp_and_af_unix() {
    let Some(t) = net_tracker() else { return };
    let bytes = MIB + 7;
    let u = run_net(&t, &["splice", &bytes.to_string(), "tcp"]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(bytes),
            ..Want::default()
        },
    );
    let u = run_net(&t, &["splice", &bytes.to_string(), "unix"]).await;
    check(
        &t,
        &u,
        Want {
            unix: both(bytes),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn a_peek_then_a_read_counts_once() {
    let Some(t) = net_tracker() else { return };
    let u = run_net(&t, &["peek", "100000", "tcp"]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(100_000),
            ..Want::default()
        },
    );
    let u = run_net(&t, &["peek", "1200", "udp"]).await;
    check(
        &t,
        &u,
        Want {
            udp: both(1200),
            ..Want::default()
        },
    );
}

/// Runs `workload net ARGS` under the tracker with its stdout in a file; returns the usage
/// and the `key=value` pairs it printed.
async fn run_reporting(t: &Tracker, args: &[&str]) -> (ResourceUsage, Vec<(String, u64)>) {
    let path =
        std::env::temp_dir().join(format!("cylo-usage-net-{}-{}", args[0], std::process::id()));
    let mut cmd = workload(&[&["net"], args].concat());
    cmd.stdout(std::fs::File::create(&path).unwrap());
    let u = run_to_end(t, &mut cmd).await;
    let out = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(u.exit_code, Some(0), "{u:?}: {out}");
    let pairs = out
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{out}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("{out}")))
        })
        .collect();
    (u, pairs)
}

fn get(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {pairs:?}"))
        .1
}

#[tokio::test]
async fn failed_sends_and_receives_count_nothing() {
    let Some(t) = net_tracker() else { return };
    let (u, said) = run_reporting(&t, &["fail"]).await;
    eprintln!("{said:?}: {u:?}");
    // EMSGSIZE, two EAGAIN sends, one EAGAIN receive, three sends after a reset.
    assert!(get(&said, "failures") >= 6, "{said:?}");
    let sent = get(&said, "tcp_sent");
    assert!(sent > 0, "{said:?}");
    check(
        &t,
        &u,
        Want {
            tcp: (sent, get(&said, "tcp_received")),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn io_uring_inline_and_by_io_wq_workers() {
    let Some(t) = net_tracker() else { return };
    let bytes = 256 << 10;
    let u = run_net(&t, &["uring", &bytes.to_string(), "inline"]).await;
    check(
        &t,
        &u,
        Want {
            tcp: both(bytes),
            ..Want::default()
        },
    );
    let u = run_net(&t, &["uring", &bytes.to_string(), "async"]).await;
    eprintln!("async: {u:?}");
    if u.thread_count > 1 {
        // io-wq workers are threads of the process (mainline 5.12+, and stable kernels with
        // the io_uring backport, such as Debian's 5.10): they joined the tree at creation.
        check(
            &t,
            &u,
            Want {
                tcp: both(bytes),
                ..Want::default()
            },
        );
    } else {
        // Older io-wq workers are kernel threads, not the tree's: what they move is not
        // counted (documented). Only kernels before 5.12 may take this branch.
        assert!(kernel_version() < (5, 12), "{u:?}");
        check(&t, &u, Want::default());
    }
}

#[tokio::test]
async fn netlink_is_other_where_the_path_sees_it() {
    let Some(t) = net_tracker() else { return };
    let (u, said) = run_reporting(&t, &["netlink"]).await;
    let n = network(&u);
    if sees_other(&t) {
        assert_eq!(n.other_sent, Some(get(&said, "other_sent")), "{u:?}");
        assert_eq!(
            n.other_received,
            Some(get(&said, "other_received")),
            "{u:?}"
        );
        assert!(get(&said, "other_received") > 0);
    } else {
        assert_eq!((n.other_sent, n.other_received), (None, None), "{u:?}");
    }
    assert_eq!(u.network_bytes_sent, Some(0), "{u:?}");
    assert_eq!(n.unix_sent, 0, "{u:?}");
}

#[tokio::test]
async fn traffic_of_unrelated_processes_is_not_counted() {
    let Some(t) = net_tracker() else { return };
    // Outside the tree, at the same time: TCP and UDP over loopback, and AF_UNIX.
    let big = (128 * MIB).to_string();
    let mut others: Vec<_> = [
        vec!["net", "tcp", &big, &big],
        vec!["net", "udp", "20000", "1000"],
        vec!["net", "unix-stream", &big],
    ]
    .iter()
    .map(|args| Command::new(WORKLOAD).args(args).spawn().unwrap())
    .collect();
    let u = run_net(&t, &["tcp", &MIB.to_string(), &MIB.to_string()]).await;
    for o in &mut others {
        assert!(o.wait().unwrap().success());
    }
    check(
        &t,
        &u,
        Want {
            tcp: both(2 * MIB),
            ..Want::default()
        },
    );
}

#[tokio::test]
async fn with_one_end_outside_only_the_trees_side_counts() {
    let Some(t) = net_tracker() else { return };
    let (send, recv) = (700_001_u64, 300_003_u64);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    // The other end: this test process, not in the tree.
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = vec![0u8; send as usize];
        s.read_exact(&mut got).unwrap();
        s.write_all(&vec![1u8; recv as usize]).unwrap();
    });
    let u = run_net(
        &t,
        &[
            "connect",
            &port.to_string(),
            &send.to_string(),
            &recv.to_string(),
        ],
    )
    .await;
    peer.join().unwrap();
    check(
        &t,
        &u,
        Want {
            tcp: (send, recv),
            ..Want::default()
        },
    );
}
