//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`). (in progress)
