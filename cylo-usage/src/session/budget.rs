//! A memory budget for what sessions keep on their clients' behalf: per-process breakdowns
//! (`--tree`) and event backlogs (`--events` data a client has not read yet).
//!
//! A daemon has one [`Budget`]: a global cap in bytes, and a share per user. Each session
//! draws on its user's share through a [`Share`] (its breakdown and its backlog draw on the
//! same one); what a session holds goes back when it ends. A draw that would pass the user's
//! share or the global cap is refused, and the session drops what it could not keep (a
//! process of its breakdown, an event) and says so in its own report, naming the [`Limit`].
//! Root (uid 0) is bound by the global cap only, and has room that other users together
//! cannot take: they may hold at most the cap less one user's share (at most a quarter of
//! the cap).
//!
//! Bytes are real bytes: a breakdown charges what its tables allocate (their capacities) and
//! each process's own strings (see `crate::session::breakdown`), measured in that module's tests against
//! the allocator.
use crate::sys::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The daemon's cap when the host's memory cannot be read.
const FALLBACK_GLOBAL_BYTES: u64 = 256 << 20;
/// The default global cap: a sixteenth of the host's memory, within these bounds.
const MIN_GLOBAL_BYTES: u64 = 64 << 20;
const MAX_GLOBAL_BYTES: u64 = 1 << 30;
/// The default share of one user: an eighth of the global cap.
const USER_SHARE_DIVISOR: u64 = 8;

/// The limit a refused draw ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The user's share (`bytes`) is held in full by that user's sessions.
    UserShare {
        /// The user.
        uid: u32,
        /// The user's share, in bytes.
        bytes: u64,
    },
    /// The daemon's global cap (`bytes`) is reached (for users other than root: the cap less
    /// root's reserve).
    Global {
        /// The global cap, in bytes.
        bytes: u64,
    },
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        match self {
            Limit::UserShare { uid, bytes } => write!(
                f,
                "user {uid}'s memory share of {:.1} MiB (serve --memory-per-user)",
                mib(*bytes)
            ),
            Limit::Global { bytes } => write!(
                f,
                "the daemon's memory cap of {:.1} MiB for breakdowns and event backlogs \
                 (serve --memory-max)",
                mib(*bytes)
            ),
        }
    }
}

#[derive(Default)]
struct Held {
    /// Bytes held by every session.
    all: u64,
    /// Bytes held by users other than root.
    others: u64,
    by_user: HashMap<u32, u64>,
}

/// The daemon's memory budget for breakdowns and event backlogs.
pub struct Budget {
    global: u64,
    per_user: u64,
    /// What users other than root may hold together.
    others: u64,
    held: Mutex<Held>,
}

impl Budget {
    /// A budget of `global_bytes` in all, of which each user other than root may hold
    /// `per_user_bytes` (root: up to the global cap; the others together: up to the cap less
    /// root's reserve, one user's share but at most a quarter of the cap).
    pub fn new(global_bytes: u64, per_user_bytes: u64) -> Arc<Budget> {
        let reserve = per_user_bytes.min(global_bytes / 4);
        Arc::new(Budget {
            global: global_bytes,
            per_user: per_user_bytes.min(global_bytes),
            others: global_bytes - reserve,
            held: Mutex::default(),
        })
    }

    /// The default for this host: a sixteenth of its memory (64 MiB to 1 GiB) in all, an
    /// eighth of that per user.
    pub fn for_host() -> Arc<Budget> {
        let global = host_memory()
            .map(|m| (m / 16).clamp(MIN_GLOBAL_BYTES, MAX_GLOBAL_BYTES))
            .unwrap_or(FALLBACK_GLOBAL_BYTES);
        Budget::new(global, global / USER_SHARE_DIVISOR)
    }

    /// The global cap.
    pub fn global_bytes(&self) -> u64 {
        self.global
    }

    /// One user's share.
    pub fn per_user_bytes(&self) -> u64 {
        self.per_user
    }

    /// A new session's account on user `uid`'s share.
    pub fn account(self: &Arc<Self>, uid: u32) -> Share {
        Share::of(Some(self.clone()), uid)
    }

    /// Bytes held now by every session.
    pub fn held_bytes(&self) -> u64 {
        self.lock().all
    }

    /// Bytes held now by the sessions of `uid`.
    pub fn held_by(&self, uid: u32) -> u64 {
        self.lock().by_user.get(&uid).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        lock(&self.held)
    }

    /// Takes `bytes` for `uid` if its share and the cap allow (always, with `force`: for
    /// the few bytes a reconciliation finds beyond what was admitted).
    fn take(&self, uid: u32, bytes: u64, force: bool) -> Result<(), Limit> {
        let mut h = self.lock();
        let mine = h.by_user.get(&uid).copied().unwrap_or(0);
        if !force {
            if uid != 0 && mine + bytes > self.per_user {
                return Err(Limit::UserShare {
                    uid,
                    bytes: self.per_user,
                });
            }
            if uid != 0 && h.others + bytes > self.others {
                return Err(Limit::Global { bytes: self.global });
            }
            if h.all + bytes > self.global {
                return Err(Limit::Global { bytes: self.global });
            }
        }
        h.all += bytes;
        if uid != 0 {
            h.others += bytes;
        }
        *h.by_user.entry(uid).or_default() += bytes;
        Ok(())
    }

    fn give_back(&self, uid: u32, bytes: u64) {
        let mut h = self.lock();
        h.all = h.all.saturating_sub(bytes);
        if uid != 0 {
            h.others = h.others.saturating_sub(bytes);
        }
        if let Some(n) = h.by_user.get_mut(&uid) {
            *n = n.saturating_sub(bytes);
            if *n == 0 {
                h.by_user.remove(&uid);
            }
        }
    }
}

/// The host's memory (`MemTotal`), in bytes.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// One session's account on its user's share. Clones are the same account (a session's
/// breakdown and its event backlog share one); whatever it still holds goes back to the
/// budget when the last clone is dropped.
#[derive(Clone)]
pub struct Share {
    inner: Arc<Account>,
}

struct Account {
    budget: Option<Arc<Budget>>,
    uid: u32,
    held: AtomicU64,
    /// The first limit a draw ran into, if any.
    refused: Mutex<Option<Limit>>,
}

impl Share {
    fn of(budget: Option<Arc<Budget>>, uid: u32) -> Share {
        Share {
            inner: Arc::new(Account {
                budget,
                uid,
                held: AtomicU64::new(0),
                refused: Mutex::new(None),
            }),
        }
    }

    /// An account without limit (an in-process tracker's runs: their memory is their
    /// caller's own).
    pub fn unlimited() -> Share {
        Share::of(None, 0)
    }

    /// Takes `bytes` from the share, or says which limit refuses them (and remembers it for
    /// [`Share::refused`]).
    pub fn try_take(&self, bytes: u64) -> Result<(), Limit> {
        if let Some(b) = &self.inner.budget
            && let Err(limit) = b.take(self.inner.uid, bytes, false)
        {
            let mut r = lock(&self.inner.refused);
            r.get_or_insert(limit);
            return Err(limit);
        }
        self.inner.held.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Takes `bytes` whatever the limits say: for a reconciliation of what was admitted with
    /// what was really allocated (a few bytes either way).
    pub fn force_take(&self, bytes: u64) {
        if let Some(b) = &self.inner.budget {
            let _ = b.take(self.inner.uid, bytes, true);
        }
        self.inner.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives `bytes` back (at most what the account holds).
    pub fn give_back(&self, bytes: u64) {
        let held = &self.inner.held;
        let mut now = held.load(Ordering::Relaxed);
        let back = loop {
            let back = bytes.min(now);
            match held.compare_exchange_weak(now, now - back, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break back,
                Err(actual) => now = actual,
            }
        };
        if let Some(b) = &self.inner.budget {
            b.give_back(self.inner.uid, back);
        }
    }

    /// Bytes the account holds now.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// The first limit that refused a draw of this account, if any did.
    pub fn refused(&self) -> Option<Limit> {
        *lock(&self.inner.refused)
    }
}

impl Default for Share {
    fn default() -> Self {
        Share::unlimited()
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("uid", &self.inner.uid)
            .field("held", &self.held())
            .field("limited", &self.inner.budget.is_some())
            .finish()
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(self.uid, *self.held.get_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_user_is_held_to_its_share_and_gets_it_back_when_its_sessions_end() {
        let b = Budget::new(100 * MIB, 10 * MIB);
        let s1 = b.account(1000);
        let s2 = b.account(1000);
        s1.try_take(6 * MIB).unwrap();
        assert_eq!(
            s2.try_take(5 * MIB),
            Err(Limit::UserShare {
                uid: 1000,
                bytes: 10 * MIB
            }),
            "two sessions of one user share one share"
        );
        assert_eq!(
            s2.refused(),
            Some(Limit::UserShare {
                uid: 1000,
                bytes: 10 * MIB
            })
        );
        assert_eq!(s1.refused(), None);
        s2.try_take(4 * MIB).unwrap();
        assert_eq!(b.held_by(1000), 10 * MIB);
        // Another user is not affected.
        b.account(1001).try_take(10 * MIB).unwrap();
        // The account given back piecewise, then dropped with the rest.
        s1.give_back(2 * MIB);
        assert_eq!(s1.held(), 4 * MIB);
        let clone = s1.clone();
        drop(s1);
        assert_eq!(b.held_by(1000), 8 * MIB, "a clone keeps the account");
        drop(clone);
        assert_eq!(b.held_by(1000), 4 * MIB);
        drop(s2);
        assert_eq!(b.held_by(1000), 0);
        // The other user's account was dropped at once.
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn users_together_cannot_take_roots_reserve() {
        let b = Budget::new(40 * MIB, 8 * MIB);
        let users: Vec<Share> = (0..10).map(|u| b.account(2000 + u)).collect();
        let mut refused_at = None;
        for (i, s) in users.iter().enumerate() {
            if let Err(limit) = s.try_take(8 * MIB) {
                refused_at = Some((i, limit));
                break;
            }
        }
        // 40 MiB less root's reserve of 8 MiB: four users' shares.
        assert_eq!(refused_at, Some((4, Limit::Global { bytes: 40 * MIB })));
        assert_eq!(b.held_bytes(), 32 * MIB);
        // Root is not held to a user's share, only to the cap.
        let root = b.account(0);
        root.try_take(8 * MIB).unwrap();
        assert_eq!(root.try_take(1), Err(Limit::Global { bytes: 40 * MIB }));
        drop(users);
        root.try_take(20 * MIB).unwrap();
        assert_eq!(b.held_by(0), 28 * MIB);
    }

    #[test]
    fn giving_back_more_than_is_held_gives_back_what_is_held() {
        let b = Budget::new(10 * MIB, 10 * MIB);
        let s = b.account(7);
        s.try_take(100).unwrap();
        s.give_back(1000);
        assert_eq!((s.held(), b.held_bytes()), (0, 0));
        // A forced draw passes the limits (a reconciliation), and still counts.
        s.force_take(11 * MIB);
        assert_eq!(b.held_bytes(), 11 * MIB);
        assert!(s.try_take(1).is_err());
        drop(s);
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn an_unlimited_share_never_refuses() {
        let s = Share::unlimited();
        s.try_take(u64::MAX / 2).unwrap();
        assert_eq!(s.held(), u64::MAX / 2);
        assert_eq!(s.refused(), None);
    }

    #[test]
    fn the_hosts_default_is_within_its_bounds() {
        let b = Budget::for_host();
        assert!((MIN_GLOBAL_BYTES..=MAX_GLOBAL_BYTES).contains(&b.global_bytes()));
        assert_eq!(b.per_user_bytes(), b.global_bytes() / USER_SHARE_DIVISOR);
    }

    #[test]
    fn limits_say_which_limit_and_how_much() {
        let user = Limit::UserShare {
            uid: 1000,
            bytes: 64 * MIB,
        };
        assert!(
            user.to_string()
                .contains("user 1000's memory share of 64.0 MiB")
        );
        let global = Limit::Global { bytes: 512 * MIB };
        assert!(global.to_string().contains("cap of 512.0 MiB"));
    }
}
