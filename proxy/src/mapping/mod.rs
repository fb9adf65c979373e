//! One port mapping, whichever front end asked for it (the configuration file, the runtime
//! API, `berth forward`, `berth-docker-proxy`): specified, validated and started one way.
//!
//! - [`spec`]: [`Spec`], and [`Draft::resolve`], the one validator.
//! - [`bound`]: the socket, bound here or adopted from whoever bound it.
//! - [`kernel`]: the kernel programs the mappings share, loaded on first need.
//! - [`running`]: a mapping being served, and how it drains.

pub mod bound;
pub mod kernel;
pub mod running;
pub mod spec;

pub use bound::{AdoptError, Bound};
pub use kernel::{Kernel, KernelModeError, Prepared, SockmapUnavailable};
pub use running::{Counters, RelayCounters, Running, StartError};
pub use spec::{Defaults, Draft, FieldError, ModeChoice, Options, Spec};
