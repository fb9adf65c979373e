//! The container side: a bridge, one network namespace per container and veth pairs, built with
//! rtnetlink the way the classic "simulate Docker networking" walk-through builds them with `ip`.
//!
//! ```text
//!   root namespace                         container namespaces
//!   ┌────────────────────────────┐         ┌──────────────────────┐
//!   │ berth0 172.16.1.254/16     │         │ c1: eth0 172.16.1.1  │
//!   │   ├── ve-c1 ──────veth─────┼─────────┤     default via .254 │
//!   │   └── ve-c2 ──────veth─────┼──┐      └──────────────────────┘
//!   └────────────────────────────┘  │      ┌──────────────────────┐
//!                                   └──────┤ c2: eth0 172.16.1.2  │
//!                                          └──────────────────────┘
//! ```

mod error;
mod ifname;
mod link;
pub mod netns;
mod nft;
mod spec;
mod state;
mod topology;

pub use error::NetError;
pub use ifname::IfName;
pub use link::Netlink;
pub use netns::NetNs;
pub use nft::{exists as masquerade_installed, table_name as masquerade_table};
pub use spec::{
    ContainerSpec, DEFAULT_BRIDGE, DEFAULT_GATEWAY, DEFAULT_SUBNET, Topology, TopologyFile,
};
pub use topology::{DownReport, down, up};
