//! Wall-clock time. A component has no clock of its own (no WASI); this is the host's.

/// Milliseconds since the Unix epoch (UTC).
#[must_use]
pub fn now_ms() -> u64 {
    crate::host::now_ms()
}
