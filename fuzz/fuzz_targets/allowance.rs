//! Fuzz target: the sockmap redirect allowance over arbitrary growing counters.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::allowance(data));
