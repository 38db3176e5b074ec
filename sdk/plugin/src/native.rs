//! In-process stand-ins for the host's capabilities, used outside a component (native tests,
//! native tools). The state is per thread, so parallel tests do not see each other's config,
//! logs or key-value entries; [`crate::testing`] is the public face of it.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::log::Level;

/// Lines kept for [`crate::testing::logs`]; older ones are dropped.
const KEPT_LOG_LINES: usize = 10_000;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) config: BTreeMap<String, String>,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) now_ms: Option<u64>,
    #[cfg(feature = "adapter")]
    pub(crate) related: BTreeMap<String, std::rc::Rc<dyn crate::io::ReadAt>>,
    #[cfg(feature = "hook")]
    pub(crate) kv: BTreeMap<String, Vec<u8>>,
    #[cfg(any(feature = "adapter", feature = "hook"))]
    pub(crate) http_handler: Option<Box<crate::testing::HttpHandler>>,
    #[cfg(any(feature = "adapter", feature = "hook"))]
    pub(crate) sent: Vec<crate::http::Request>,
}

thread_local! {
    pub(crate) static STATE: RefCell<State> = RefCell::new(State::default());
}

pub(crate) fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

pub(crate) fn log(level: Level, message: &str) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        // Native runs have a terminal: this is where a plugin's log lines show up in tests.
        eprintln!("[plugin {level}] {message}");
    }
    with(|s| {
        if s.logs.len() == KEPT_LOG_LINES {
            s.logs.remove(0);
        }
        s.logs.push((level, message.to_owned()));
    });
}

pub(crate) fn config_get(key: &str) -> Option<String> {
    with(|s| s.config.get(key).cloned())
}

pub(crate) fn config_keys() -> Vec<String> {
    with(|s| s.config.keys().cloned().collect())
}

pub(crate) fn now_ms() -> u64 {
    if let Some(ms) = with(|s| s.now_ms) {
        return ms;
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }
    #[cfg(target_arch = "wasm32")]
    {
        // A wasm build with no world enabled has no clock.
        0
    }
}

#[cfg(feature = "adapter")]
pub(crate) fn open_related(name: &str) -> Result<crate::adapter::Reader, crate::io::IoError> {
    use crate::io::{IoError, IoErrorKind};
    if name.contains(['/', '\\']) || name == ".." || name == "." {
        return Err(IoError::new(
            IoErrorKind::Denied,
            format!("related name `{name}` is not a plain file name"),
        ));
    }
    with(|s| s.related.get(name).cloned())
        .map(crate::adapter::Reader::new)
        .ok_or_else(|| {
            IoError::new(
                IoErrorKind::NotFound,
                format!("no related object `{name}` (natively: see testing::add_related)"),
            )
        })
}

/// Caps of the WIT `kv` interface, enforced natively so tests see what the host would refuse.
#[cfg(feature = "hook")]
mod kv_caps {
    pub(crate) const MAX_KEY: usize = 256;
    pub(crate) const MAX_VALUE: usize = 64 << 10;
    pub(crate) const MAX_KEYS: usize = 256;
}

#[cfg(feature = "hook")]
pub(crate) fn kv_get(key: &str) -> Option<Vec<u8>> {
    with(|s| s.kv.get(key).cloned())
}

#[cfg(feature = "hook")]
pub(crate) fn kv_set(key: &str, value: &[u8]) -> Result<(), crate::io::IoError> {
    use crate::io::{IoError, IoErrorKind};
    if key.len() > kv_caps::MAX_KEY {
        return Err(IoError::new(
            IoErrorKind::Denied,
            format!(
                "kv key of {} bytes is over {} bytes",
                key.len(),
                kv_caps::MAX_KEY
            ),
        ));
    }
    if value.len() > kv_caps::MAX_VALUE {
        return Err(IoError::new(
            IoErrorKind::Denied,
            format!(
                "kv value of {} bytes is over {} bytes",
                value.len(),
                kv_caps::MAX_VALUE
            ),
        ));
    }
    with(|s| {
        if !s.kv.contains_key(key) && s.kv.len() >= kv_caps::MAX_KEYS {
            return Err(IoError::new(
                IoErrorKind::Denied,
                format!("kv already holds {} keys", kv_caps::MAX_KEYS),
            ));
        }
        s.kv.insert(key.to_owned(), value.to_vec());
        Ok(())
    })
}

#[cfg(feature = "hook")]
pub(crate) fn kv_delete(key: &str) {
    with(|s| s.kv.remove(key));
}

#[cfg(any(feature = "adapter", feature = "hook"))]
pub(crate) fn http_send(
    request: crate::http::Request,
) -> Result<crate::http::Response, crate::io::IoError> {
    use crate::io::{IoError, IoErrorKind};
    // The handler is taken out while it runs, so it may itself use the SDK (log, kv, ...).
    let handler = with(|s| {
        s.sent.push(request.clone());
        s.http_handler.take()
    });
    let Some(mut handler) = handler else {
        return Err(IoError::new(
            IoErrorKind::Denied,
            format!(
                "no HTTP natively: {} {} (see testing::set_http_handler)",
                request.method, request.url
            ),
        ));
    };
    let response = handler(&request);
    with(|s| {
        if s.http_handler.is_none() {
            s.http_handler = Some(handler);
        }
    });
    response
}
