//! The daemon's wire protocol (version [`VERSION`]; documented in `docs/protocol.md`).
//!
//! A Unix stream socket carries frames: a 4-byte little-endian length, then that many bytes
//! of one JSON object. The client sends a request and reads its reply before the next; the
//! daemon never speaks first. File descriptors travel as `SCM_RIGHTS` with the request or
//! reply that needs them. The first request of a connection is `hello` with the client's
//! protocol version; another version gets an error reply and the connection is closed.
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::kernel::features::Feature;
use crate::usage::{Budgets, ResourceUsage};

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// The largest request the daemon reads (requests are small; a larger one is an error).
pub const MAX_REQUEST: usize = 64 * 1024;
/// The largest reply a client reads (a report with a large breakdown).
pub const MAX_REPLY: usize = 512 * 1024 * 1024;
/// The most file descriptors one frame may carry.
pub const MAX_FDS: usize = 4;

/// What a session records besides the totals (the daemon's `RunOptions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionOptions {
    /// A per-process breakdown in the report.
    #[serde(default)]
    pub tree: bool,
    /// The NDJSON event stream: the daemon makes a pipe, keeps its write end and sends the
    /// read end with the reply (after the wake-up eventfd).
    #[serde(default)]
    pub events: bool,
    /// The most processes the breakdown keeps (0: the default).
    #[serde(default)]
    pub tree_limit: u64,
    /// The budgets the client asks for (`max_processes`, `max_cpu_ns`, ... as in
    /// [`Budgets`]); absent (or `null`, or `{}`): none. A client other than root gets them
    /// within the daemon's ceilings (`serve --max-*`). An unknown field, or a value that is
    /// not a whole number from 0 to 2^64 - 1, makes the request malformed.
    #[serde(
        default,
        skip_serializing_if = "Budgets::is_empty",
        deserialize_with = "strict_budgets"
    )]
    pub budgets: Budgets,
}

/// The names of [`Budgets`]' fields on the wire.
fn budget_names() -> Vec<String> {
    let mut all = Budgets::default();
    for r in crate::usage::Resource::ALL {
        all.set(r, Some(0));
    }
    match serde_json::to_value(all) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// A `budgets` object: only [`Budgets`]' own fields (a misspelt one must not pass for no
/// budget), each a count, a number of ns or of bytes (or `null`: none).
fn strict_budgets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Budgets, D::Error> {
    use serde::de::Error;
    let Some(map) = Option::<serde_json::Map<String, serde_json::Value>>::deserialize(d)? else {
        return Ok(Budgets::default());
    };
    let known = budget_names();
    if let Some(k) = map.keys().find(|k| !known.contains(k)) {
        return Err(D::Error::custom(format!(
            "budgets: unknown field `{k}`, expected one of {}",
            known.join(", ")
        )));
    }
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| D::Error::custom(format!("budgets: {e}")))
}

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// First on every connection.
    Hello { version: u32 },
    /// The counters measured on this kernel, and how.
    Features,
    /// Carries the fd of the client's `/proc/thread-self` directory: that thread's next new
    /// task is the root of a new session. The client creates it right after the reply, then
    /// sends `spawned`.
    Spawn { options: SessionOptions },
    /// The client created its child (`created`), or failed to.
    Spawned { session: u64, created: bool },
    /// Carries a pidfd of the process to attach to.
    Attach { options: SessionOptions },
    /// Whether the session's tree has ended, and the root's status once known.
    Status { session: u64 },
    /// What the session's tree has used so far.
    Usage { session: u64, breakdown: bool },
    /// Sends `signal` to every live process of the session's tree.
    Kill { session: u64, signal: i32 },
    /// Marks the session as ended by the client's timeout.
    TimedOut { session: u64 },
    /// Ends the session (its kernel state is freed; its processes keep running).
    End { session: u64 },
}

/// Why the daemon refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not a request of this protocol (garbage, too long, missing descriptors).
    BadRequest,
    /// Another protocol version.
    Version,
    /// The client may not do this (another user's process, another user's session).
    Permission,
    /// Every run slot of the daemon is taken.
    Busy,
    /// The client's user has as many sessions as the daemon allows.
    Limit,
    /// No such session on this connection.
    NoSuchSession,
    /// The process asked for does not exist (or has exited).
    NoSuchProcess,
    /// This kernel cannot do it (e.g. attach without the layout it needs).
    Unsupported,
    /// A budget of the session is refused: one that can never be met (`max_processes: 0`),
    /// or one this daemon's kernel cannot enforce. Starting the run another way would not
    /// enforce it either: the client fails rather than run the command unbounded.
    Budget,
    /// The operation failed in the daemon.
    Failed,
}

/// The daemon's reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        version: u32,
        /// The daemon's crate version.
        daemon: String,
        /// The client's uid as the daemon authenticated it (`SO_PEERCRED`).
        uid: u32,
    },
    Features {
        kernel: String,
        features: Vec<Feature>,
        layout: String,
    },
    /// `spawn`: registered; carries the session's wake-up eventfd (then, with `events`, the
    /// event stream's read end).
    Prepared {
        session: u64,
    },
    /// `spawned` or `attach`: the session runs (`attach` carries the wake-up eventfd, then,
    /// with `events`, the event stream's read end).
    Started {
        session: u64,
    },
    Status {
        finished: bool,
        /// The root's wait status (`code << 8 | signal`), once the kernel recorded its end.
        root_status: Option<i32>,
    },
    Usage {
        usage: Box<ResourceUsage>,
    },
    Killed {
        signalled: u64,
    },
    Done,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The other end closed the connection (or reset it) before the frame was whole.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame's length prefix announced more than the reader accepts.
    #[error("a frame of {len} bytes is larger than the {max} allowed")]
    TooLong {
        /// The length the frame announced, in bytes.
        len: usize,
        /// The most the reader accepts, in bytes.
        max: usize,
    },
    /// The frame was not sent or received in full before its deadline.
    #[error("the frame did not complete within its deadline")]
    Deadline,
    /// A system call on the socket failed.
    #[error("{syscall} on the daemon socket failed")]
    Io {
        /// The system call (`sendmsg`, `recvmsg`, `poll`).
        syscall: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// How a frame waits for its socket when it is not ready: a deadline for the daemon, a
/// deadline and a signal watch for a client.
pub trait Wait {
    /// Returns once `sock` may be ready for `events` (`POLLIN`/`POLLOUT`), or an error that
    /// ends the frame.
    fn wait(&mut self, sock: RawFd, events: i16) -> Result<(), FrameError>;
}

/// Waits until a deadline (`None`: for ever).
pub struct Until(pub Option<Instant>);

impl Wait for Until {
    fn wait(&mut self, sock: RawFd, events: i16) -> Result<(), FrameError> {
        loop {
            let ms = match self.0 {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(FrameError::Deadline);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: sock,
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            match r {
                0 => continue,
                r if r > 0 => return Ok(()),
                _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {
                    continue;
                }
                _ => {
                    return Err(FrameError::Io {
                        syscall: "poll",
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
        }
    }
}

/// Writes `bytes` as one frame, with `fds` attached to its first byte (no deadline: the
/// unit tests' form).
#[cfg(test)]
pub fn send_frame(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<(), FrameError> {
    send_frame_waiting(sock, bytes, fds, &mut Until(None))
}

/// [`send_frame`], all of it by `deadline` (`None`: no deadline): a peer that takes the
/// frame a byte at a time cannot stretch it past the deadline.
pub fn send_frame_until(
    sock: RawFd,
    bytes: &[u8],
    fds: &[RawFd],
    deadline: Option<Instant>,
) -> Result<(), FrameError> {
    send_frame_waiting(sock, bytes, fds, &mut Until(deadline))
}

/// [`send_frame`], waiting as `wait` says whenever the socket takes nothing more now.
pub fn send_frame_waiting(
    sock: RawFd,
    bytes: &[u8],
    fds: &[RawFd],
    wait: &mut dyn Wait,
) -> Result<(), FrameError> {
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(bytes);
    let mut sent = 0;
    while sent < frame.len() {
        let some = if sent == 0 { fds } else { &[] };
        match send_some(sock, &frame[sent..], some)? {
            Some(n) => sent += n,
            None => wait.wait(sock, libc::POLLOUT)?,
        }
    }
    Ok(())
}

/// Sends what the socket takes of `bytes` now; `None` when it would block.
fn send_some(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<Option<usize>, FrameError> {
    assert!(fds.len() <= MAX_FDS);
    let iov = [IoSlice::new(bytes)];
    let mut control = [0u64; 8]; // CMSG_SPACE(4 * MAX_FDS), 8-aligned
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = std::mem::size_of_val(fds);
        // SAFETY: CMSG macros on a control buffer large enough for MAX_FDS descriptors.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: msg is fully initialised; MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
        // MSG_DONTWAIT: any wait is the caller's ([`Wait`]), bounded as it says.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(FrameError::Closed),
            _ => {
                return Err(FrameError::Io {
                    syscall: "sendmsg",
                    source: e,
                });
            }
        }
    }
}

/// Reads up to `buf.len()` bytes; descriptors that come with them are appended to `fds`
/// (beyond [`MAX_FDS`] per frame they are closed). 0 bytes: the peer closed. `None`: nothing
/// to read now.
fn recv_some(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<Option<usize>, FrameError> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = [0u64; 8];
    loop {
        // SAFETY: a zeroed msghdr is valid; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: valid msghdr; received descriptors are close-on-exec.
        let n =
            unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::ECONNRESET) => return Err(FrameError::Closed),
                _ => {
                    return Err(FrameError::Io {
                        syscall: "recvmsg",
                        source: e,
                    });
                }
            }
        }
        // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                        if fds.len() < MAX_FDS {
                            fds.push(fd);
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        return Ok(Some(n as usize));
    }
}

/// Reads one frame of at most `max` bytes, and the descriptors that came with it (no
/// deadline: the unit tests' form).
#[cfg(test)]
pub fn recv_frame(sock: RawFd, max: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    recv_frame_waiting(sock, max, &mut Until(None))
}

/// [`recv_frame`], all of it by `deadline` (`None`: no deadline): a peer that trickles a
/// frame a byte at a time cannot stretch it past the deadline.
pub fn recv_frame_until(
    sock: RawFd,
    max: usize,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    recv_frame_waiting(sock, max, &mut Until(deadline))
}

/// [`recv_frame`], waiting as `wait` says whenever nothing more can be read now.
pub fn recv_frame_waiting(
    sock: RawFd,
    max: usize,
    wait: &mut dyn Wait,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    let mut fds = Vec::new();
    let mut head = [0u8; 4];
    read_exact(sock, &mut head, &mut fds, wait)?;
    let len = u32::from_le_bytes(head) as usize;
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    let mut body = vec![0u8; len];
    read_exact(sock, &mut body, &mut fds, wait)?;
    Ok((body, fds))
}

fn read_exact(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    wait: &mut dyn Wait,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match recv_some(sock, &mut buf[got..], fds)? {
            Some(0) => return Err(FrameError::Closed),
            Some(n) => got += n,
            None => wait.wait(sock, libc::POLLIN)?,
        }
    }
    Ok(())
}

/// Sends `value` as one frame with `fds`.
pub fn send<T: Serialize>(sock: &impl AsRawFd, value: &T, fds: &[RawFd]) -> Result<(), FrameError> {
    send_until(sock, value, fds, None)
}

/// [`send`], all of it by `deadline`.
pub fn send_until<T: Serialize>(
    sock: &impl AsRawFd,
    value: &T,
    fds: &[RawFd],
    deadline: Option<Instant>,
) -> Result<(), FrameError> {
    let bytes = serde_json::to_vec(value).expect("protocol types serialise");
    send_frame_until(sock.as_raw_fd(), &bytes, fds, deadline)
}

/// A refusal of a request: the error reply's kind and its one-line message.
pub(crate) type Refusal = (ErrorKind, String);

pub(crate) fn refusal(kind: ErrorKind, message: impl Into<String>) -> Refusal {
    (kind, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let r = Request::Spawn {
            options: SessionOptions {
                tree: true,
                events: false,
                tree_limit: 10,
                budgets: Budgets::default(),
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"op":"spawn","options":{"tree":true,"events":false,"tree_limit":10}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"hello","version":1,"x":2}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"kill","session":1}"#).is_err());
        let hello: Request = serde_json::from_str(r#"{"op":"hello","version":7}"#).unwrap();
        assert_eq!(hello, Request::Hello { version: 7 });
    }

    #[test]
    fn budgets_travel_by_their_own_names_and_nothing_else_passes_for_them() {
        let budgets = Budgets {
            max_processes: Some(20),
            max_cpu_ns: Some(500_000_000),
            ..Budgets::default()
        };
        let r = Request::Spawn {
            options: SessionOptions {
                budgets,
                ..SessionOptions::default()
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"op":"spawn","options":{"tree":false,"events":false,"tree_limit":0,"budgets":{"max_processes":20,"max_cpu_ns":500000000}}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        // Absent, null or empty: none (the requests of clients that know no budgets).
        for options in [r#"{}"#, r#"{"budgets":null}"#, r#"{"budgets":{}}"#] {
            let text = format!(r#"{{"op":"attach","options":{options}}}"#);
            let Request::Attach { options } = serde_json::from_str(&text).unwrap() else {
                panic!("{text}");
            };
            assert!(options.budgets.is_empty(), "{text}");
        }
        // Every field, and `null` for one of them.
        let text = r#"{"op":"attach","options":{"budgets":{"max_processes":1,"max_threads":2,"max_cpu_ns":3,"max_memory_bytes":4,"max_disk_write_bytes":5,"max_disk_read_bytes":6,"max_network_bytes":null}}}"#;
        let Request::Attach { options } = serde_json::from_str(text).unwrap() else {
            panic!("{text}");
        };
        assert_eq!(options.budgets.max_disk_read_bytes, Some(6));
        assert_eq!(options.budgets.max_network_bytes, None);
        for (budgets, why) in [
            (r#"{"max_procs":5}"#, "unknown field `max_procs`"),
            (r#"{"max_processes":-1}"#, "invalid value"),
            (r#"{"max_processes":"ten"}"#, "invalid type"),
            (r#"{"max_cpu_ns":1.5}"#, "invalid type"),
            (r#"{"max_memory_bytes":18446744073709551616}"#, ""),
            (r#"[20]"#, "invalid type"),
            (r#"20"#, "invalid type"),
        ] {
            let text = format!(r#"{{"op":"spawn","options":{{"budgets":{budgets}}}}}"#);
            let e = serde_json::from_str::<Request>(&text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn frames_carry_bytes_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        send_frame(a.as_raw_fd(), b"{\"op\":\"features\"}", &[r.as_raw_fd()]).unwrap();
        let (body, fds) = recv_frame(b.as_raw_fd(), MAX_REQUEST).unwrap();
        assert_eq!(body, b"{\"op\":\"features\"}");
        assert_eq!(fds.len(), 1);
        // Too long: refused from the header alone.
        send_frame(a.as_raw_fd(), &[b'x'; 100], &[]).unwrap();
        assert!(matches!(
            recv_frame(b.as_raw_fd(), 50),
            Err(FrameError::TooLong { len: 100, max: 50 })
        ));
        drop(a);
        let mut rest = [0u8; 100];
        let _ = read_exact(b.as_raw_fd(), &mut rest, &mut Vec::new(), &mut Until(None));
        assert!(matches!(
            recv_frame(b.as_raw_fd(), 50),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn a_truncated_frame_is_a_closed_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(&[10, 0, 0, 0, b'{']).unwrap();
        drop(a);
        assert!(matches!(
            recv_frame(b.as_raw_fd(), MAX_REQUEST),
            Err(FrameError::Closed)
        ));
    }

    mod hostile_input {
        //! The frame decoder and the request parser against arbitrary bytes (proptest, a
        //! bounded number of cases so that it runs in every test run): they answer every
        //! input with a value or an error, never a panic, a hang or a read past the frame.
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn any_byte_stream_is_a_frame_or_an_error(
                bytes in proptest::collection::vec(any::<u8>(), 0..600),
                max in 0usize..512,
            ) {
                let (a, b) = UnixStream::pair().unwrap();
                use std::io::Write;
                (&a).write_all(&bytes).unwrap();
                drop(a);
                let deadline = Some(Instant::now() + std::time::Duration::from_secs(5));
                match recv_frame_until(b.as_raw_fd(), max, deadline) {
                    Ok((body, fds)) => {
                        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
                        prop_assert!(len <= max);
                        prop_assert_eq!(&body[..], &bytes[4..4 + len]);
                        prop_assert!(fds.is_empty());
                    }
                    Err(FrameError::TooLong { len, max: m }) => {
                        prop_assert!(len > m);
                    }
                    Err(FrameError::Closed) => {
                        // Fewer bytes than the header, or than the header announces.
                        let mut head = [0u8; 4];
                        for (h, b) in head.iter_mut().zip(&bytes) {
                            *h = *b;
                        }
                        let announced = 4 + u32::from_le_bytes(head) as usize;
                        prop_assert!(bytes.len() < 4 || bytes.len() < announced);
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }

            #[test]
            fn any_bytes_parse_to_a_request_or_an_error(
                bytes in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let _ = serde_json::from_slice::<Request>(&bytes);
            }

            #[test]
            fn json_near_the_protocol_parses_or_is_refused_and_requests_round_trip(
                op in prop::sample::select(vec![
                    "hello", "features", "spawn", "spawned", "attach", "status", "usage",
                    "kill", "timed-out", "end", "format-disk", "",
                ]),
                session in any::<i128>(),
                signal in any::<i64>(),
                flag in any::<bool>(),
                limit in any::<i128>(),
                extra in prop::option::of("[a-z_]{1,8}"),
            ) {
                let mut text = format!(
                    r#"{{"op":"{op}","session":{session},"signal":{signal},"version":{signal},"created":{flag},"breakdown":{flag},"options":{{"tree":{flag},"events":{flag},"tree_limit":{limit}}}"#
                );
                if let Some(x) = extra {
                    text.push_str(&format!(r#","{x}":1"#));
                }
                text.push('}');
                if let Ok(request) = serde_json::from_str::<Request>(&text) {
                    let again = serde_json::to_string(&request).unwrap();
                    prop_assert_eq!(serde_json::from_str::<Request>(&again).unwrap(), request);
                }
                // Each op with exactly its own fields parses.
                let own = match op {
                    "hello" => Some(format!(r#"{{"op":"hello","version":{}}}"#, signal as u32)),
                    "usage" => Some(format!(
                        r#"{{"op":"usage","session":{},"breakdown":{flag}}}"#,
                        session as u64
                    )),
                    "kill" => Some(format!(
                        r#"{{"op":"kill","session":{},"signal":{}}}"#,
                        session as u64, signal as i32
                    )),
                    _ => None,
                };
                if let Some(own) = own {
                    prop_assert!(serde_json::from_str::<Request>(&own).is_ok(), "{}", own);
                }
            }
        }
    }
}
