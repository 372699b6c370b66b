//! Kernel-version knowledge, resolved once at start-up. (in progress)
