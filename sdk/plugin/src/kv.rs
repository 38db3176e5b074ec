//! Key-value state scoped to one run of a recovery plan.
//!
//! A hook is instantiated afresh for each call, so a pre phase cannot leave anything in memory
//! for its post phase; it leaves it here instead. Keys up to 256 bytes, values up to 64 KiB, at
//! most 256 keys per run. Prefix keys with the step name so two steps using the same plugin do
//! not collide.

use crate::io::IoError;

/// The value of `key` in this run, if set.
#[must_use]
pub fn get(key: &str) -> Option<Vec<u8>> {
    crate::host::kv_get(key)
}

/// Set `key` to `value` for the rest of this run.
///
/// # Errors
/// [`crate::io::IoErrorKind::Denied`] when a cap is exceeded.
pub fn set(key: &str, value: &[u8]) -> Result<(), IoError> {
    crate::host::kv_set(key, value)
}

/// Remove `key` (nothing happens when it is not set).
pub fn delete(key: &str) {
    crate::host::kv_delete(key);
}
