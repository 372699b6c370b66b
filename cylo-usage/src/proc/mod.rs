//! Trees seen through /proc: the walker of a process tree (`walker`), which the fallback
//! tracker (`crate::session::fallback`), the one-shot snapshot (`crate::front::snapshot`)
//! and a daemon client's follower use. The readers of /proc files themselves are
//! `crate::sys::procfs`.
pub(crate) mod walker;
