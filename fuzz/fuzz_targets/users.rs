//! libFuzzer entry point; the property is [`sudp_fuzz::users`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sudp_fuzz::users(data));
