#![no_main]
// What a webhook endpoint answers decides whether a failover goes ahead.
use ferry_plugin_sdk::http::Response;
use ferry_plugin_webhook::{OnFailure, outcome_of};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let status = if data.first().is_some_and(|b| b & 1 == 1) { 200 } else { 503 };
    let r = Response { status, headers: Vec::new(), body: data.to_vec() };
    let _ = outcome_of(Ok(r), "http://hooks.example/x?token=t", OnFailure::Abort);
});
