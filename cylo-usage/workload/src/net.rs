//! `cylo-usage-workload net MODE ...`: socket traffic with known byte counts, over loopback
//! only (127.0.0.1, ::1, AF_UNIX, netlink to the kernel). Unless a mode says otherwise, both
//! ends are in the tree: the process forks, the child does one side and the parent the
//! other, and every count below is what the tree's sends put in and its receives took out.
//!
//! Modes:
//! - `tcp SEND RECV [v4|v6] [CHUNK]`: the child connects and writes SEND bytes, the parent
//!   reads them and writes RECV bytes back, which the child reads; CHUNK bytes per write
//!   (default 65536). TCP sent = received = SEND + RECV.
//! - `udp N SIZE [WINDOW]`: the child sends N datagrams of SIZE bytes to the parent, which
//!   acknowledges every WINDOW (default 64) and the last with a 1-byte datagram, so none is
//!   dropped. UDP sent = received = N * SIZE + ceil(N / WINDOW).
//! - `mmsg N SIZE`: the same with sendmmsg / recvmmsg, 16 datagrams per call (N a multiple
//!   of 16), one 1-byte acknowledgement per batch. UDP = N * SIZE + N / 16 both ways.
//! - `unix-stream BYTES`: a socketpair; the child writes BYTES, the parent reads them and
//!   writes them back. AF_UNIX sent = received = 2 * BYTES.
//! - `unix-dgram N SIZE` / `seqpacket N SIZE`: a SOCK_DGRAM / SOCK_SEQPACKET socketpair; the
//!   child sends N datagrams of SIZE bytes (AF_UNIX datagrams are never dropped: a full queue
//!   blocks the sender). AF_UNIX sent = received = N * SIZE.
//! - `sendfile BYTES`: the child sendfile()s a file of BYTES bytes into a TCP socket, the
//!   parent reads it. TCP sent = received = BYTES.
//! - `splice BYTES tcp|unix`: the child writes BYTES into a pipe, 64 KiB at a time, and
//!   splice()s each from the pipe into a TCP or AF_UNIX stream socket; the parent reads.
//! - `peek BYTES tcp|udp`: the child sends BYTES (one datagram for UDP); the parent peeks
//!   with MSG_PEEK at what is queued, reads exactly that, and repeats until all BYTES are in.
//!   Sent = received = BYTES.
//! - `fail`: sends and receives that fail: a UDP datagram too large (EMSGSIZE), a TCP socket
//!   written until EAGAIN and once more, a receive with nothing queued (EAGAIN), a send after
//!   the peer reset the connection. Prints `tcp_sent=A tcp_received=B udp_sent=0
//!   udp_received=0 failures=F`: the bytes the calls that succeeded returned, and how many
//!   calls failed. One process.
//! - `connect PORT SEND RECV`: connects to 127.0.0.1:PORT (the other end is not in the tree),
//!   writes SEND bytes, then reads RECV bytes. TCP sent = SEND, received = RECV.
//! - `uring BYTES inline|async`: one process, both ends of a TCP connection: BYTES sent and
//!   received in 16 KiB io_uring SEND / RECV operations, done inline, or with IOSQE_ASYNC by
//!   io-wq workers. TCP sent = received = BYTES.
//! - `netlink`: a NETLINK_ROUTE link dump: sends one 32-byte request, receives the dump.
//!   Prints `other_sent=32 other_received=R`. One process.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

fn die(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("net: {what}: {e}");
    std::process::exit(1)
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn num(args: &[String], i: usize, usage: &str) -> u64 {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| die("usage", usage))
}

fn word<'a>(args: &'a [String], i: usize, default: &'a str) -> &'a str {
    args.get(i).map_or(default, String::as_str)
}

/// Forks; 0 in the child, the child's pid in the parent.
fn fork_child() -> libc::pid_t {
    // SAFETY: the process is single-threaded here.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        die("fork", last_error());
    }
    pid
}

/// Waits for the child and fails if it failed.
fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        die("waitpid", last_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        die("the child", format!("wait status {status:#x}"));
    }
}

fn write_bytes(w: &mut impl Write, mut n: u64, chunk: usize) {
    let buf = vec![0x5a_u8; chunk];
    while n > 0 {
        let k = n.min(chunk as u64) as usize;
        w.write_all(&buf[..k]).unwrap_or_else(|e| die("write", e));
        n -= k as u64;
    }
}

fn read_bytes(r: &mut impl Read, n: u64) {
    let mut buf = vec![0u8; 1 << 16];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        match r.read(&mut buf[..k]) {
            Ok(0) => die(
                "read",
                format!("end of stream with {left} of {n} bytes missing"),
            ),
            Ok(got) => left -= got as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => die("read", e),
        }
    }
}

/// A connected pair of loopback TCP sockets (client, server).
fn tcp_pair(v6: bool) -> (TcpStream, TcpStream) {
    let addr: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die("bind", e));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| die("local_addr", e));
    let client = TcpStream::connect(addr).unwrap_or_else(|e| die("connect", e));
    let (server, _) = listener.accept().unwrap_or_else(|e| die("accept", e));
    (client, server)
}

/// Two loopback UDP sockets connected to each other.
fn udp_pair() -> (UdpSocket, UdpSocket) {
    let bind = || UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap_or_else(|e| die("bind", e));
    let (a, b) = (bind(), bind());
    let addr = |s: &UdpSocket| s.local_addr().unwrap_or_else(|e| die("local_addr", e));
    a.connect(addr(&b)).unwrap_or_else(|e| die("connect", e));
    b.connect(addr(&a)).unwrap_or_else(|e| die("connect", e));
    (a, b)
}

fn recv_exact_datagram(s: &UdpSocket, size: usize, buf: &mut [u8]) {
    let got = s.recv(buf).unwrap_or_else(|e| die("recv", e));
    if got != size {
        die(
            "recv",
            format!("a datagram of {got} bytes, expected {size}"),
        );
    }
}

fn tcp(args: &[String]) {
    const USAGE: &str = "net tcp SEND RECV [v4|v6] [CHUNK]";
    let (send, recv) = (num(args, 0, USAGE), num(args, 1, USAGE));
    let v6 = match word(args, 2, "v4") {
        "v4" => false,
        "v6" => true,
        _ => die("usage", USAGE),
    };
    let chunk = args.get(3).map_or(65536, |_| num(args, 3, USAGE)) as usize;
    if chunk == 0 {
        die("usage", USAGE);
    }
    let (mut client, mut server) = tcp_pair(v6);
    let pid = fork_child();
    if pid == 0 {
        drop(server);
        write_bytes(&mut client, send, chunk);
        read_bytes(&mut client, recv);
        std::process::exit(0);
    }
    {
        drop(client);
        read_bytes(&mut server, send);
        write_bytes(&mut server, recv, chunk);
    }
    reap(pid);
}

fn udp(args: &[String]) {
    const USAGE: &str = "net udp N SIZE [WINDOW]";
    let (n, size) = (num(args, 0, USAGE), num(args, 1, USAGE) as usize);
    let window = args.get(2).map_or(64, |_| num(args, 2, USAGE));
    if window == 0 || size == 0 || size > 65507 {
        die("usage", USAGE);
    }
    let (a, b) = udp_pair();
    // Room for a whole window in the receive queue.
    set_buffer(b.as_raw_fd(), libc::SO_RCVBUF, 1 << 20);
    let pid = fork_child();
    if pid == 0 {
        let data = vec![0x33_u8; size];
        let mut ack = [0u8; 1];
        for i in 1..=n {
            a.send(&data).unwrap_or_else(|e| die("send", e));
            if i % window == 0 || i == n {
                recv_exact_datagram(&a, 1, &mut ack);
            }
        }
        std::process::exit(0);
    }
    {
        let mut buf = vec![0u8; size + 1];
        for i in 1..=n {
            recv_exact_datagram(&b, size, &mut buf);
            if i % window == 0 || i == n {
                b.send(&[1]).unwrap_or_else(|e| die("send", e));
            }
        }
    }
    reap(pid);
}

fn set_buffer(fd: RawFd, option: i32, bytes: i32) {
    // SAFETY: a valid int option value. A smaller buffer than asked for is fine.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&bytes as *const i32).cast(),
            size_of::<i32>() as u32,
        )
    };
}

fn mmsg(args: &[String]) {
    const USAGE: &str = "net mmsg N SIZE";
    const BATCH: usize = 16;
    let (n, size) = (num(args, 0, USAGE), num(args, 1, USAGE) as usize);
    if !n.is_multiple_of(BATCH as u64) || size == 0 || size > 65507 {
        die("usage", USAGE);
    }
    let (a, b) = udp_pair();
    set_buffer(b.as_raw_fd(), libc::SO_RCVBUF, 1 << 20);
    // One buffer per message of the batch, and the headers that point at them.
    let mut bufs = vec![vec![0x44_u8; size + 1]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: size,
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zero is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let batches = n / BATCH as u64;
    let pid = fork_child();
    if pid == 0 {
        let mut ack = [0u8; 1];
        for _ in 0..batches {
            // SAFETY: BATCH valid headers pointing at live buffers.
            let sent = unsafe { libc::sendmmsg(a.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if sent != BATCH as i32 {
                die("sendmmsg", format!("{sent}: {}", last_error()));
            }
            recv_exact_datagram(&a, 1, &mut ack);
        }
        std::process::exit(0);
    }
    {
        for _ in 0..batches {
            // Blocking, without MSG_WAITFORONE: returns once all BATCH have arrived.
            // SAFETY: as above; a null timeout.
            let got = unsafe {
                libc::recvmmsg(
                    b.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    0,
                    std::ptr::null_mut(),
                )
            };
            if got != BATCH as i32 {
                die("recvmmsg", format!("{got}: {}", last_error()));
            }
            if let Some(m) = msgs.iter().find(|m| m.msg_len as usize != size) {
                die("recvmmsg", format!("a datagram of {} bytes", m.msg_len));
            }
            b.send(&[1]).unwrap_or_else(|e| die("send", e));
        }
    }
    reap(pid);
}

fn unix_stream(args: &[String]) {
    let bytes = num(args, 0, "net unix-stream BYTES");
    let (mut a, mut b) = UnixStream::pair().unwrap_or_else(|e| die("socketpair", e));
    let pid = fork_child();
    if pid == 0 {
        drop(b);
        write_bytes(&mut a, bytes, 65536);
        read_bytes(&mut a, bytes);
        std::process::exit(0);
    }
    {
        drop(a);
        read_bytes(&mut b, bytes);
        write_bytes(&mut b, bytes, 65536);
    }
    reap(pid);
}

/// `unix-dgram` and `seqpacket`: datagrams over an AF_UNIX socketpair of `kind`.
fn unix_datagrams(args: &[String], kind: i32) {
    const USAGE: &str = "net unix-dgram|seqpacket N SIZE";
    let (n, size) = (num(args, 0, USAGE), num(args, 1, USAGE) as usize);
    if size == 0 {
        die("usage", USAGE);
    }
    let mut fds = [0; 2];
    // SAFETY: valid array of two fds.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        die("socketpair", last_error());
    }
    let pid = fork_child();
    if pid == 0 {
        let data = vec![0x77_u8; size];
        for _ in 0..n {
            // SAFETY: a live buffer of `size` bytes.
            let sent = unsafe { libc::send(fds[0], data.as_ptr().cast(), size, 0) };
            if sent != size as isize {
                die("send", format!("{sent}: {}", last_error()));
            }
        }
        std::process::exit(0);
    }
    {
        let mut buf = vec![0u8; size + 1];
        for _ in 0..n {
            // SAFETY: a live buffer of `size + 1` bytes.
            let got = unsafe { libc::recv(fds[1], buf.as_mut_ptr().cast(), size + 1, 0) };
            if got != size as isize {
                die("recv", format!("{got}: {}", last_error()));
            }
        }
    }
    reap(pid);
}

/// A temporary file of `bytes` bytes, already unlinked.
fn temp_file(bytes: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("cylo-usage-net-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| die(&format!("create {}", path.display()), e));
    let _ = std::fs::remove_file(&path);
    write_bytes(&mut f, bytes, 1 << 20);
    f
}

fn sendfile(args: &[String]) {
    let bytes = num(args, 0, "net sendfile BYTES");
    let file = temp_file(bytes);
    let (client, mut server) = tcp_pair(false);
    let pid = fork_child();
    if pid == 0 {
        drop(server);
        let mut offset: libc::off_t = 0;
        while (offset as u64) < bytes {
            let left = (bytes - offset as u64) as usize;
            // SAFETY: valid fds and offset pointer.
            let sent =
                unsafe { libc::sendfile(client.as_raw_fd(), file.as_raw_fd(), &mut offset, left) };
            if sent <= 0 {
                die("sendfile", format!("{sent}: {}", last_error()));
            }
        }
        std::process::exit(0);
    }
    {
        drop(client);
        read_bytes(&mut server, bytes);
    }
    reap(pid);
}

fn splice(args: &[String]) {
    const USAGE: &str = "net splice BYTES tcp|unix";
    const CHUNK: u64 = 1 << 16;
    let bytes = num(args, 0, USAGE);
    let (tx, mut rx): (RawFd, Box<dyn Read>) = match word(args, 1, "") {
        "tcp" => {
            let (c, s) = tcp_pair(false);
            let fd = c.as_raw_fd();
            std::mem::forget(c);
            (fd, Box::new(s))
        }
        "unix" => {
            let (a, b) = UnixStream::pair().unwrap_or_else(|e| die("socketpair", e));
            let fd = a.as_raw_fd();
            std::mem::forget(a);
            (fd, Box::new(b))
        }
        _ => die("usage", USAGE),
    };
    let pid = fork_child();
    if pid == 0 {
        let mut pipe = [0; 2];
        // SAFETY: valid array of two fds.
        if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
            die("pipe", last_error());
        }
        // SAFETY: makes the pipe hold a whole chunk (64 KiB is the default anyway).
        unsafe { libc::fcntl(pipe[1], libc::F_SETPIPE_SZ, CHUNK as i32) };
        let data = vec![0x66_u8; CHUNK as usize];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(CHUNK) as usize;
            // SAFETY: a live buffer of k bytes.
            if unsafe { libc::write(pipe[1], data.as_ptr().cast(), k) } != k as isize {
                die("write to the pipe", last_error());
            }
            let mut in_pipe = k;
            while in_pipe > 0 {
                // SAFETY: plain splice between our own fds.
                let moved = unsafe {
                    libc::splice(
                        pipe[0],
                        std::ptr::null_mut(),
                        tx,
                        std::ptr::null_mut(),
                        in_pipe,
                        libc::SPLICE_F_MOVE,
                    )
                };
                if moved <= 0 {
                    die("splice", format!("{moved}: {}", last_error()));
                }
                in_pipe -= moved as usize;
            }
            left -= k as u64;
        }
        std::process::exit(0);
    }
    {
        // SAFETY: closes the parent's copy of the sending end.
        unsafe { libc::close(tx) };
        read_bytes(&mut rx, bytes);
    }
    reap(pid);
}

fn peek(args: &[String]) {
    const USAGE: &str = "net peek BYTES tcp|udp";
    let bytes = num(args, 0, USAGE) as usize;
    let kind = word(args, 1, "");
    let (tx, rx): (Box<dyn Write>, RawFd) = match kind {
        "tcp" => {
            let (c, s) = tcp_pair(false);
            let fd = s.as_raw_fd();
            std::mem::forget(s);
            (Box::new(c), fd)
        }
        "udp" if bytes <= 65507 => {
            let (a, b) = udp_pair();
            let fd = b.as_raw_fd();
            std::mem::forget(b);
            (Box::new(UdpWriter(a)), fd)
        }
        _ => die("usage", USAGE),
    };
    let mut tx = tx;
    let pid = fork_child();
    if pid == 0 {
        tx.write_all(&vec![0x11_u8; bytes])
            .unwrap_or_else(|e| die("send", e));
        std::process::exit(0);
    }
    {
        drop(tx);
        // Peek at whatever is queued (blocking until something is), then read exactly that;
        // repeat until every byte is in. Every byte is peeked once and read once.
        let mut buf = vec![0u8; bytes + 1];
        let mut left = bytes;
        while left > 0 {
            // SAFETY: a live buffer of at least `left` bytes.
            let peeked = unsafe { libc::recv(rx, buf.as_mut_ptr().cast(), left, libc::MSG_PEEK) };
            if peeked <= 0 {
                die("recv(MSG_PEEK)", format!("{peeked}: {}", last_error()));
            }
            // SAFETY: as above; the peeked bytes are queued, so this returns them all.
            let got = unsafe { libc::recv(rx, buf.as_mut_ptr().cast(), peeked as usize, 0) };
            if got != peeked {
                die(
                    "recv",
                    format!("{got} bytes after peeking {peeked}: {}", last_error()),
                );
            }
            left -= got as usize;
        }
    }
    reap(pid);
}

/// A connected UDP socket as a writer of one datagram per write.
struct UdpWriter(UdpSocket);

impl Write for UdpWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `send(2)` with MSG_NOSIGNAL | `flags`; the byte count or the error.
fn send_raw(fd: RawFd, data: &[u8], flags: i32) -> Result<usize, std::io::Error> {
    // SAFETY: a live buffer.
    let r = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | flags,
        )
    };
    if r < 0 {
        Err(last_error())
    } else {
        Ok(r as usize)
    }
}

fn fail() {
    let mut failures = 0u64;
    let (mut tcp_sent, mut tcp_received) = (0u64, 0u64);
    // A UDP datagram larger than the protocol allows.
    let (a, _b) = udp_pair();
    match send_raw(a.as_raw_fd(), &vec![0u8; 70_000], 0) {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => failures += 1,
        other => die(
            "an oversized UDP send",
            format!("{other:?}, expected EMSGSIZE"),
        ),
    }
    // A TCP socket filled until EAGAIN, then written once more.
    let (client, mut server) = tcp_pair(false);
    set_buffer(client.as_raw_fd(), libc::SO_SNDBUF, 64 << 10);
    set_buffer(server.as_raw_fd(), libc::SO_RCVBUF, 64 << 10);
    let chunk = vec![0x22_u8; 16 << 10];
    let mut eagain = 0;
    while eagain < 2 {
        match send_raw(client.as_raw_fd(), &chunk, libc::MSG_DONTWAIT) {
            Ok(n) => tcp_sent += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                failures += 1;
                eagain += 1;
            }
            Err(e) => die("send", e),
        }
    }
    read_bytes(&mut server, tcp_sent);
    tcp_received += tcp_sent;
    // A receive with nothing queued.
    let mut buf = [0u8; 16];
    // SAFETY: a live buffer.
    let r = unsafe {
        libc::recv(
            server.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 && last_error().kind() == std::io::ErrorKind::WouldBlock {
        failures += 1;
    } else {
        die("an empty receive", format!("{r}, expected EAGAIN"));
    }
    // The peer resets the connection (linger 0); sends fail with ECONNRESET, then EPIPE.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger value.
    unsafe {
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    drop(server);
    for _ in 0..3 {
        match send_raw(client.as_raw_fd(), &chunk[..1000], 0) {
            Ok(n) => tcp_sent += n as u64,
            Err(_) => failures += 1,
        }
    }
    println!(
        "tcp_sent={tcp_sent} tcp_received={tcp_received} udp_sent=0 udp_received=0 \
         failures={failures}"
    );
}

fn connect(args: &[String]) {
    const USAGE: &str = "net connect PORT SEND RECV";
    let port = num(args, 0, USAGE) as u16;
    let (send, recv) = (num(args, 1, USAGE), num(args, 2, USAGE));
    let mut s =
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap_or_else(|e| die("connect", e));
    write_bytes(&mut s, send, 65536);
    read_bytes(&mut s, recv);
}

fn netlink() {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
    if fd < 0 {
        die("socket(AF_NETLINK)", last_error());
    }
    // struct nlmsghdr (16 bytes) + struct ifinfomsg (16 bytes, zero: every family).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let sent = send_raw(fd, &req, 0).unwrap_or_else(|e| die("send(netlink)", e));
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    'dump: loop {
        // SAFETY: a live buffer.
        let got = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got <= 0 {
            die("recv(netlink)", last_error());
        }
        received += got as u64;
        let mut off = 0usize;
        while off + 16 <= got as usize {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if kind == libc::NLMSG_DONE as u16 || kind == libc::NLMSG_ERROR as u16 {
                break 'dump;
            }
            if len < 16 {
                die("recv(netlink)", "a message shorter than its header");
            }
            off += (len + 3) & !3;
        }
    }
    println!("other_sent={sent} other_received={received}");
}

pub fn main(args: &[String]) {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("tcp") => tcp(rest),
        Some("udp") => udp(rest),
        Some("mmsg") => mmsg(rest),
        Some("unix-stream") => unix_stream(rest),
        Some("unix-dgram") => unix_datagrams(rest, libc::SOCK_DGRAM),
        Some("seqpacket") => unix_datagrams(rest, libc::SOCK_SEQPACKET),
        Some("sendfile") => sendfile(rest),
        Some("splice") => splice(rest),
        Some("peek") => peek(rest),
        Some("fail") => fail(),
        Some("connect") => connect(rest),
        Some("uring") => uring::main(rest),
        Some("netlink") => netlink(),
        _ => die(
            "usage",
            "net tcp|udp|mmsg|unix-stream|unix-dgram|seqpacket|sendfile|splice|peek|fail|\
             connect|uring|netlink ...",
        ),
    }
}

/// A minimal io_uring (raw syscalls, one operation in flight), enough for SEND and RECV.
mod uring {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::{die, last_error, num, tcp_pair, word};

    const OFF_SQ_RING: i64 = 0;
    const OFF_CQ_RING: i64 = 0x800_0000;
    const OFF_SQES: i64 = 0x1000_0000;
    const ENTER_GETEVENTS: u32 = 1;
    const OP_SEND: u8 = 26;
    const OP_RECV: u8 = 27;
    /// IOSQE_ASYNC: always hand the operation to an io-wq worker.
    const SQE_ASYNC: u8 = 1 << 4;

    #[repr(C)]
    #[derive(Default)]
    struct SqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        flags: u32,
        dropped: u32,
        array: u32,
        resv1: u32,
        resv2: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct CqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        overflow: u32,
        cqes: u32,
        flags: u32,
        resv1: u32,
        resv2: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        sq_off: SqOffsets,
        cq_off: CqOffsets,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Sqe {
        opcode: u8,
        flags: u8,
        ioprio: u16,
        fd: i32,
        off: u64,
        addr: u64,
        len: u32,
        msg_flags: u32,
        user_data: u64,
        buf_index: u16,
        personality: u16,
        splice_fd_in: i32,
        pad: [u64; 2],
    }

    #[repr(C)]
    struct Cqe {
        user_data: u64,
        res: i32,
        flags: u32,
    }

    const _: () = assert!(size_of::<Sqe>() == 64 && size_of::<Params>() == 120);

    struct Ring {
        fd: i32,
        sq: *mut u8,
        cq: *mut u8,
        sqes: *mut Sqe,
        p: Params,
    }

    fn map(fd: i32, len: usize, offset: i64) -> *mut u8 {
        // SAFETY: maps a region the kernel made for this ring fd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            die("mmap(io_uring)", last_error());
        }
        p.cast()
    }

    impl Ring {
        fn new() -> Ring {
            let mut p = Params::default();
            // SAFETY: a valid params struct.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut p) } as i32;
            if fd < 0 {
                die("io_uring_setup", last_error());
            }
            let sq = map(
                fd,
                (p.sq_off.array + p.sq_entries * 4) as usize,
                OFF_SQ_RING,
            );
            let cq = map(
                fd,
                (p.cq_off.cqes + p.cq_entries * size_of::<Cqe>() as u32) as usize,
                OFF_CQ_RING,
            );
            let sqes = map(fd, p.sq_entries as usize * size_of::<Sqe>(), OFF_SQES).cast();
            Ring {
                fd,
                sq,
                cq,
                sqes,
                p,
            }
        }

        fn word(base: *mut u8, off: u32) -> &'static AtomicU32 {
            // SAFETY: a 4-byte aligned u32 of a live shared mapping, used atomically.
            unsafe { &*(base.add(off as usize) as *const AtomicU32) }
        }

        /// Submits one operation and waits for its completion; returns its result.
        fn run(&mut self, sqe: Sqe) -> i32 {
            let o = &self.p.sq_off;
            let tail = Self::word(self.sq, o.tail).load(Ordering::Acquire);
            let mask = Self::word(self.sq, o.ring_mask).load(Ordering::Relaxed);
            let index = tail & mask;
            // SAFETY: index < sq_entries, within the mapped SQE array and index array.
            unsafe {
                *self.sqes.add(index as usize) = sqe;
                *(self.sq.add((o.array + 4 * index) as usize) as *mut u32) = index;
            }
            Self::word(self.sq, o.tail).store(tail.wrapping_add(1), Ordering::Release);
            // SAFETY: plain syscall on our ring.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd,
                    1u32,
                    1u32,
                    ENTER_GETEVENTS,
                    std::ptr::null::<u8>(),
                    0usize,
                )
            };
            if r < 0 {
                die("io_uring_enter", last_error());
            }
            let c = &self.p.cq_off;
            let head = Self::word(self.cq, c.head).load(Ordering::Acquire);
            let tail = Self::word(self.cq, c.tail).load(Ordering::Acquire);
            if head == tail {
                die("io_uring_enter", "returned without a completion");
            }
            let mask = Self::word(self.cq, c.ring_mask).load(Ordering::Relaxed);
            // SAFETY: a completion the kernel wrote, within the mapped CQE array.
            let res = unsafe {
                (*(self
                    .cq
                    .add(c.cqes as usize + (head & mask) as usize * size_of::<Cqe>())
                    as *const Cqe))
                    .res
            };
            Self::word(self.cq, c.head).store(head.wrapping_add(1), Ordering::Release);
            res
        }

        /// SEND (or RECV) of all of `buf` on `fd`, in as many operations as it takes.
        fn transfer(&mut self, op: u8, flags: u8, fd: i32, buf: &mut [u8]) {
            let mut done = 0;
            while done < buf.len() {
                let res = self.run(Sqe {
                    opcode: op,
                    flags,
                    fd,
                    addr: buf[done..].as_mut_ptr() as u64,
                    len: (buf.len() - done) as u32,
                    ..Sqe::default()
                });
                if res <= 0 {
                    let what = if op == OP_SEND { "SEND" } else { "RECV" };
                    die(
                        &format!("io_uring {what}"),
                        std::io::Error::from_raw_os_error(-res),
                    );
                }
                done += res as usize;
            }
        }
    }

    pub fn main(args: &[String]) {
        const USAGE: &str = "net uring BYTES inline|async";
        const CHUNK: usize = 16 << 10;
        let bytes = num(args, 0, USAGE) as usize;
        let flags = match word(args, 1, "") {
            "inline" => 0,
            "async" => SQE_ASYNC,
            _ => die("usage", USAGE),
        };
        if !bytes.is_multiple_of(CHUNK) {
            die("usage", "net uring: BYTES must be a multiple of 16384");
        }
        let (client, server) = tcp_pair(false);
        let mut ring = Ring::new();
        let mut out = vec![0x99_u8; CHUNK];
        let mut input = vec![0u8; CHUNK];
        for _ in 0..bytes / CHUNK {
            ring.transfer(OP_SEND, flags, client.as_raw_fd(), &mut out);
            ring.transfer(OP_RECV, flags, server.as_raw_fd(), &mut input);
        }
    }
}
