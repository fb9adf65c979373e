//! UDP forwarding (in progress): per-client flows, each with its own socket to the target.
//!
//! [`flows`] holds the flow table's logic, free of I/O so that expiry and eviction can be
//! tested with a paused clock; the socket side arrives with the UDP issue.

pub mod flows;
