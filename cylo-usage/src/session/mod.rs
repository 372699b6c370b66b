//! A session: a tree followed in the kernel (`run`) from its start (`spawn`) or from an
//! attach (`attach`), the per-process records read from the kernel into a breakdown and an event
//! stream (`breakdown`), and the memory budget those may use (`budget`); or, where the eBPF
//! programs cannot be loaded, followed through /proc and `wait4()` (`fallback`). Every run
//! starts by claiming a slot in the kernel, with its share and budgets (`slot`).
pub(crate) mod attach;
pub(crate) mod breakdown;
pub mod budget;
pub(crate) mod fallback;
pub(crate) mod run;
pub(crate) mod slot;
pub(crate) mod spawn;
pub(crate) mod viewer;
