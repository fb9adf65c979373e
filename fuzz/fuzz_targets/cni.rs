//! Fuzz target: the CNI plugin's environment and stdin network configuration.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::cni(data));
