#![no_main]
// Component bytes from a plugin directory: header checks, compilation and the import summary.
use std::sync::LazyLock;

use ferry_plugin_host::{HostConfig, PluginHost};

static HOST: LazyLock<PluginHost> =
    LazyLock::new(|| PluginHost::new(HostConfig::default()).expect("plugin host"));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = HOST.inspect(data);
});
