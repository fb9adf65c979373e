//! berth: a port-forwarding proxy for containers, a drop-in for Docker's `docker-proxy`.
//!
//! # Layout
//! - [`net`]: the container network (bridge, namespaces, veth) built with rtnetlink.
//! - [`addr`]: typed listen / target / client addresses.
//! - [`relay`]: moving bytes between two TCP sockets, by copy or by splice(2).
//! - [`listen`]: binding TCP and UDP listeners, with plain errors.
//! - [`mapping`]: one mapping's spec, validation, socket and lifecycle, for every front end.
//! - [`forward`]: the TCP accept loop that connects clients to a target and relays.
//! - [`docker_proxy`]: docker-proxy's command line and fd 3 status pipe.
//! - [`cni`]: `berth-cni`, the chained CNI plugin that replaces portmap.
//! - [`ebpf`]: the embedded kernel programs and their loader.
//! - [`sockmap`]: the sockmap relay mode (bytes moved by the kernel).
//! - [`dnat`]: kernel mode: mappings served by TC and cgroup programs, no relay at all.
//! - [`service`]: `berth run`, the daemon: config, reload, admin socket, metrics, systemd.
//! - [`udp`]: UDP forwarding with one flow (and socket) per client.
//!
//! With the `fuzzing` feature, `fuzzing` holds the entry points of the fuzz targets in
//! `fuzz/`.

pub mod addr;
pub mod caps;
pub mod cni;
pub mod dnat;
pub mod docker_proxy;
pub mod ebpf;
pub mod forward;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod listen;
pub mod mapping;
pub mod net;
mod pool;
pub mod relay;
pub mod service;
pub mod sockmap;
pub mod sys;
pub mod udp;
