//! Fuzz target `config`: see `celeriac_fuzz_harness::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::config(data));
