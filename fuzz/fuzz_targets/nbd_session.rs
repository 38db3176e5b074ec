#![no_main]
// A whole NBD client conversation (handshake, options, requests) against the real server code.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_nbd::fuzzing::fuzz_session(data));
