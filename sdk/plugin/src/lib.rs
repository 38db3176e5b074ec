//! The guest SDK for Ferry plugins: write a source adapter or a failover hook in plain Rust and
//! build it into a WebAssembly component.
//!
//! A Ferry plugin is a component targeting one world of the `ferry:plugin` WIT package
//! (`sdk/wit/ferry-plugin.wit`). This crate hides the generated bindings behind ordinary Rust
//! types and traits, and generates the export glue:
//!
//! | Module | Why it exists |
//! |---|---|
//! | [`adapter`] (feature `adapter`) | [`adapter::SourceAdapter`] and [`adapter::Disk`]: read a disk container format; [`adapter::Reader`], the object the host opened |
//! | [`hook`] (feature `hook`) | [`hook::FailoverHook`]: a pre/post step of a recovery plan |
//! | [`holes`] (feature `adapter`) | the holes of the files a disk is stored in, so `extents` reports them unallocated |
//! | [`io`] | [`io::ReadAt`]: byte access that works over the host reader *and* natively over files and buffers, so parsers are unit-tested and fuzzed natively; extents and I/O errors |
//! | [`log`], [`config`], [`clock`] | the capabilities every plugin may be granted |
//! | [`http`] (either feature), [`kv`] (feature `hook`) | hooks call webhooks; API-backed adapters (EBS) call their service, signed by the host |
//! | [`testing`] (native only) | in-process stand-ins for the host, for unit tests |
//! | [`panic`](mod@panic) | panic messages reach the operator's log before the trap |
//!
//! A plugin crate enables exactly one of the features `adapter` and `hook` (so its component
//! carries one world's type information), implements the trait and invokes
//! [`export_source_adapter!`] or [`export_failover_hook!`] once. See `sdk/GUIDE.md`.
//!
//! Inside a component the capability functions call the host's imports; in a native build
//! (tests, tools) they use per-thread stand-ins set up through [`testing`]. A component imports
//! only the interfaces it actually calls, and no WASI: build with
//! `--target wasm32-unknown-unknown` (see the guide).

#![warn(missing_docs)]

#[doc(hidden)]
pub mod bindings;
#[cfg(any(feature = "adapter", feature = "hook"))]
mod convert;
mod export;
mod host;
#[cfg(not(all(target_arch = "wasm32", any(feature = "adapter", feature = "hook"))))]
mod native;

#[cfg(feature = "adapter")]
pub mod adapter;
pub mod clock;
pub mod config;
#[cfg(feature = "adapter")]
pub mod holes;
#[cfg(feature = "hook")]
pub mod hook;
#[cfg(any(feature = "adapter", feature = "hook"))]
pub mod http;
pub mod io;
#[cfg(feature = "hook")]
pub mod kv;
pub mod log;
pub mod panic;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// What the export macros expand to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    #[cfg(feature = "adapter")]
    pub use crate::bindings::adapter;
    #[cfg(feature = "hook")]
    pub use crate::bindings::hook;
    #[cfg(feature = "hook")]
    pub use crate::export::HookExport;
    #[cfg(feature = "adapter")]
    pub use crate::export::{AdapterExport, DiskExport};
}

#[cfg(test)]
mod tests {
    #[test]
    fn native_capabilities_use_the_testing_state() {
        crate::testing::reset();
        crate::testing::set_config("b", "2");
        crate::testing::set_config("a", "true");
        assert_eq!(crate::config::keys(), vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(crate::config::get_bool("a", false), Ok(true));
        assert_eq!(crate::config::get_bool("missing", true), Ok(true));
        let e = crate::config::get_bool("b", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `b` must be `true` or `false`, not `2`"
        );
        crate::testing::set_now_ms(42);
        assert_eq!(crate::clock::now_ms(), 42);
        crate::info!("hello {}", 1);
        crate::log::warn("careful");
        assert_eq!(
            crate::testing::logs(),
            vec![
                (crate::log::Level::Info, "hello 1".to_owned()),
                (crate::log::Level::Warn, "careful".to_owned())
            ]
        );
    }

    #[test]
    fn native_http_and_kv() {
        use crate::http::{Request, Response};
        use crate::io::IoErrorKind;
        crate::testing::reset();
        assert_eq!(
            crate::http::send(Request::get("http://x/"))
                .unwrap_err()
                .kind,
            IoErrorKind::Denied
        );
        crate::testing::set_http_handler(|req| {
            crate::kv::set("seen", req.url.as_bytes())?;
            Ok(Response::new(201, "ok"))
        });
        let resp = crate::http::post_json("http://x/hook", "{}").unwrap();
        assert!(resp.is_success());
        assert_eq!(resp.text(), "ok");
        let sent = crate::testing::sent_requests();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].header("Content-Type"), Some("application/json"));
        assert_eq!(
            crate::kv::get("seen").as_deref(),
            Some(&b"http://x/hook"[..])
        );
        crate::kv::delete("seen");
        assert_eq!(crate::kv::get("seen"), None);
        assert_eq!(
            crate::kv::set("k", &vec![0u8; (64 << 10) + 1])
                .unwrap_err()
                .kind,
            IoErrorKind::Denied
        );
    }
}
