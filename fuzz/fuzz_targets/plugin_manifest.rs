#![no_main]
// Plugin manifests (TOML) come from operators' plugin directories.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferry_plugin_host::Manifest::parse(text, "fuzz");
    }
});
