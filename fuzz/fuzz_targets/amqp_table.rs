//! Fuzz target `amqp_table`: see `celeriac_fuzz_harness::amqp_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::amqp_table(data));
