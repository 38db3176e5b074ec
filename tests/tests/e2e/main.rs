//! Every end-to-end test of the repository, in one test binary: each module is one area
//! (its docs say what it drives and which binaries it needs). One binary instead of one per
//! file saves linking wasmtime, the store and the test helpers nine times in CI.
//!
//! Run one area with a filter: `cargo test -p ferry-e2e --test e2e appliance::`.

mod agents;
mod appliance;
mod cli;
mod control_cli;
mod ebs;
mod export_formats;
mod export_remote;
mod format_v1;
mod nbd;
mod plugin_cli;
mod plugin_formats;
mod plugin_sandbox;
mod replication;
mod schemathesis;
mod vault_backends;
