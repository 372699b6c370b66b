//! cylo-usage: precise, eBPF-backed resource accounting for a process tree.
pub mod btf;
pub mod resolve;
