//! What the crate knows of the running kernel and how it talks to it: the kernel's BTF and the
//! layouts resolved from it (cached per boot), loading and attaching the eBPF programs
//! (`Tracker`), reading their maps, what this kernel lets them measure, and their log.
pub(crate) mod aya_loader;
pub(crate) mod btf;
pub(crate) mod budget_hooks;
pub(crate) mod ebpf_log;
#[cfg(test)]
mod embedded_object_tests;
pub mod features;
pub(crate) mod map_read;
pub(crate) mod object;
pub(crate) mod offsets_cache;
pub(crate) mod programs;
pub(crate) mod records;
pub(crate) mod resolve;
pub(crate) mod tracker;
