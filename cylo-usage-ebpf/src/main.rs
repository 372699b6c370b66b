#![no_std]
#![no_main]
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(_ctx: RawTracePointContext) -> i32 { 0 }
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! { loop {} }
