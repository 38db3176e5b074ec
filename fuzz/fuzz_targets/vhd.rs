#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_plugin_hyperv::fuzzing::vhd(data));
