//! Native stand-ins for the host, for plugin unit tests.
//!
//! Outside a component the SDK's capability functions ([`crate::log`], [`crate::config`],
//! [`crate::clock`], and `open_related`, `http`, `kv` with their features) use per-thread
//! in-process state instead of host imports. This module sets that state up and inspects it:
//!
//! ```
//! use ferry_plugin_sdk::{config, testing};
//!
//! testing::reset();
//! testing::set_config("detect-zeros", "true");
//! assert_eq!(config::get("detect-zeros").as_deref(), Some("true"));
//! ```
//!
//! Each test thread has its own state; call [`reset`] at the start of a test that depends on it.
//! Only available in native builds.

use crate::log::Level;
use crate::native::with;

/// Forget all native state: config, logs, clock, related readers, key-value entries, the HTTP
/// handler and the recorded requests.
pub fn reset() {
    with(|s| *s = crate::native::State::default());
}

/// Set a config value, as the `[config]` table of a manifest would.
pub fn set_config(key: impl Into<String>, value: impl Into<String>) {
    with(|s| s.config.insert(key.into(), value.into()));
}

/// Remove a config value.
pub fn remove_config(key: &str) {
    with(|s| s.config.remove(key));
}

/// The lines logged on this thread so far (the last 10,000).
#[must_use]
pub fn logs() -> Vec<(Level, String)> {
    with(|s| s.logs.clone())
}

/// Fix what [`crate::clock::now_ms`] returns (by default natively: the system clock).
pub fn set_now_ms(ms: u64) {
    with(|s| s.now_ms = Some(ms));
}

/// Make `reader` available to `open_related(name)`.
#[cfg(feature = "adapter")]
pub fn add_related(name: impl Into<String>, reader: impl crate::io::ReadAt + 'static) {
    let reader: std::rc::Rc<dyn crate::io::ReadAt> = std::rc::Rc::new(reader);
    with(|s| s.related.insert(name.into(), reader));
}

/// What answers [`crate::http::send`] natively.
#[cfg(any(feature = "adapter", feature = "hook"))]
pub type HttpHandler =
    dyn FnMut(&crate::http::Request) -> Result<crate::http::Response, crate::io::IoError>;

/// Answer HTTP requests with `handler` (without one, every request fails with `denied`).
#[cfg(any(feature = "adapter", feature = "hook"))]
pub fn set_http_handler(
    handler: impl FnMut(&crate::http::Request) -> Result<crate::http::Response, crate::io::IoError>
    + 'static,
) {
    with(|s| s.http_handler = Some(Box::new(handler)));
}

/// The requests sent so far, in order.
#[cfg(any(feature = "adapter", feature = "hook"))]
#[must_use]
pub fn sent_requests() -> Vec<crate::http::Request> {
    with(|s| s.sent.clone())
}

/// The key-value entries currently set.
#[cfg(feature = "hook")]
#[must_use]
pub fn kv_entries() -> Vec<(String, Vec<u8>)> {
    with(|s| s.kv.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Feed `seed` and `rounds` deterministic mutations of it (bit flips, deletions, insertions,
/// truncations) to `f`: a stable-Rust smoke run of a fuzz target, cheap enough for every
/// `cargo test`. Parsers must return errors, never panic.
pub fn mutations(seed: &[u8], rounds: usize, mut f: impl FnMut(&[u8])) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    f(seed);
    for _ in 0..rounds {
        let mut d = seed.to_vec();
        for _ in 0..=next() % 4 {
            let at = |n: u64, len: usize| usize::try_from(n).unwrap_or(0) % len.max(1);
            match next() % 4 {
                0 if !d.is_empty() => {
                    let i = at(next(), d.len());
                    d[i] ^= 1 << (next() % 8);
                }
                1 if !d.is_empty() => {
                    let i = at(next(), d.len());
                    d.remove(i);
                }
                2 => {
                    let i = at(next(), d.len() + 1);
                    d.insert(i, (next() & 0xff) as u8);
                }
                _ => {
                    let i = at(next(), d.len() + 1);
                    d.truncate(i);
                }
            }
        }
        f(&d);
    }
}
