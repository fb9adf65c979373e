//! Types and names shared by berth's eBPF programs and its user-space loader.
//!
//! Every map key and value is `#[repr(C)]` with explicit widths and no implicit padding, so that
//! both sides agree on the layout byte for byte. `aya::Pod` is implemented only with the `user`
//! feature, which the user-space crate turns on; the kernel side stays `no_std` and dependency-free.
#![no_std]

pub mod dnat;
pub mod sockmap;
