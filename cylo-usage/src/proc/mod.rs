//! Trees seen through /proc: the walker of a process tree (`walker`), the one-shot snapshot
//! (`snapshot`), and the fallback tracker that polls /proc where the eBPF programs cannot be
//! loaded (`fallback`). The readers of /proc files themselves are `crate::sys::procfs`.
pub(crate) mod fallback;
pub(crate) mod snapshot;
pub(crate) mod walker;
