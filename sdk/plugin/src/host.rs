//! The one place that decides where a capability call goes.
//!
//! Inside the host (a `wasm32` build with a world enabled) every function here calls the
//! corresponding `ferry:plugin` import. Everywhere else it uses the in-process stand-ins of
//! [`crate::native`], so that plugin logic that logs, reads its config or posts a webhook runs in
//! ordinary `cargo test` (see [`crate::testing`]). Calling a real import outside a component is
//! impossible (it has no linked implementation), hence the split.

#[cfg(all(target_arch = "wasm32", any(feature = "adapter", feature = "hook")))]
mod imp {
    // `log`, `config` and `clock` are imported by both worlds with the same core-wasm import
    // names, so either world's bindings reach the same import.
    #[cfg(feature = "adapter")]
    use crate::bindings::adapter::ferry::plugin as common;
    #[cfg(all(feature = "hook", not(feature = "adapter")))]
    use crate::bindings::hook::ferry::plugin as common;

    pub(crate) fn log(level: crate::log::Level, message: &str) {
        common::log::log(level.into(), message);
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        common::config::get(key)
    }

    pub(crate) fn config_keys() -> Vec<String> {
        common::config::keys()
    }

    pub(crate) fn now_ms() -> u64 {
        common::clock::now_ms()
    }

    #[cfg(feature = "adapter")]
    pub(crate) fn open_related(name: &str) -> Result<crate::adapter::Reader, crate::io::IoError> {
        crate::bindings::adapter::ferry::plugin::source::open_related(name)
            .map(crate::adapter::Reader::from_host)
            .map_err(Into::into)
    }

    pub(crate) fn http_send(
        request: crate::http::Request,
    ) -> Result<crate::http::Response, crate::io::IoError> {
        let request = common::http::Request {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
        };
        common::http::send(&request)
            .map(|r| crate::http::Response {
                status: r.status,
                headers: r.headers,
                body: r.body,
            })
            .map_err(Into::into)
    }

    #[cfg(feature = "hook")]
    pub(crate) fn kv_get(key: &str) -> Option<Vec<u8>> {
        crate::bindings::hook::ferry::plugin::kv::get(key)
    }

    #[cfg(feature = "hook")]
    pub(crate) fn kv_set(key: &str, value: &[u8]) -> Result<(), crate::io::IoError> {
        crate::bindings::hook::ferry::plugin::kv::set(key, value).map_err(Into::into)
    }

    #[cfg(feature = "hook")]
    pub(crate) fn kv_delete(key: &str) {
        crate::bindings::hook::ferry::plugin::kv::delete(key);
    }
}

#[cfg(not(all(target_arch = "wasm32", any(feature = "adapter", feature = "hook"))))]
mod imp {
    #[cfg(any(feature = "adapter", feature = "hook"))]
    pub(crate) use crate::native::http_send;
    #[cfg(feature = "adapter")]
    pub(crate) use crate::native::open_related;
    pub(crate) use crate::native::{config_get, config_keys, log, now_ms};
    #[cfg(feature = "hook")]
    pub(crate) use crate::native::{kv_delete, kv_get, kv_set};
}

pub(crate) use imp::*;
