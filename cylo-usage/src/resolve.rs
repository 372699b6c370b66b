//! TEMPORARY placeholder (the real BTF resolver replaces this file): host 6.18 offsets.
use cylo_usage_abi::Offsets;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("placeholder")]
    Placeholder,
}

pub fn resolve_host() -> Result<Offsets, ResolveError> {
    Ok(Offsets {
        task_pid: 1264,
        task_tgid: 1268,
        task_signal: 1848,
        task_start_boottime: 1560,
        task_sum_exec_runtime: 232,
        task_utime: 1488,
        task_stime: 1496,
        task_state: 24,
        task_state_size: 4,
        switch_has_prev_state: 1,
        task_dead: 0x80,
        _pad0: 0,
    })
}
