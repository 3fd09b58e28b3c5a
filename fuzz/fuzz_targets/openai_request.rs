#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton_fuzz::openai_request(data));
