//! Fuzz target: the UDP flow table against a model, driven by arbitrary operations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::flow_table(data));
