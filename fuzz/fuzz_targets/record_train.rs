//! libFuzzer entry point; the property is [`sudp_fuzz::record_train`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sudp_fuzz::record_train(data));
