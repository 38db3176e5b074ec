//! Host bindings generated from `sdk/wit/ferry-plugin.wit`, one module per world.
//!
//! Every import and export is async so a call can yield at epoch ticks (the deadline) and host
//! imports can wait on I/O with timeouts. The hook world reuses the adapter world's shared
//! interfaces so the host implements `log`, `config`, `clock` and `http` once.

pub mod adapter {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "source-adapter",
        imports: { default: async },
        exports: { default: async },
        with: {
            "ferry:plugin/source.reader": crate::source::ReaderHandle,
        },
    });
}

pub mod hook {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "failover-hook",
        imports: { default: async },
        exports: { default: async },
        with: {
            "ferry:plugin/types": crate::bindings::adapter::ferry::plugin::types,
            "ferry:plugin/log": crate::bindings::adapter::ferry::plugin::log,
            "ferry:plugin/config": crate::bindings::adapter::ferry::plugin::config,
            "ferry:plugin/clock": crate::bindings::adapter::ferry::plugin::clock,
            "ferry:plugin/http": crate::bindings::adapter::ferry::plugin::http,
        },
    });
}
