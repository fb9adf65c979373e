//! The admin socket's line protocol, free of I/O: what a line asks for, and the answer's shape.
//!
//! A request is one line: a bare word (`status`, `reload`, `list`) or a JSON object with an
//! `op`. Each gets one JSON line back ([`Reply`]). A connection may send many requests; the
//! mappings it added with `"lease": true` (the default) are removed when it closes. Those
//! added with `"persist": true` outlive the connection and the daemon: they are kept in its
//! state file until removed, by name or by owner.
//!
//! ```text
//! > {"op":"add","owner":"docker","mapping":{"proto":"tcp","listen":"0.0.0.0:9091","target":"172.17.0.2:80"}}
//! < {"ok":true,"message":"added docker-tcp-9091-any","mappings":[{"name":"docker-tcp-9091-any",...}]}
//! > {"op":"remove","name":"docker-tcp-9091-any"}
//! < {"ok":true,"message":"removed docker-tcp-9091-any; its socket is closed","mappings":[]}
//! ```
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::status::Row;
use crate::{
    addr::{ListenAddr, Proto},
    mapping::Draft,
};

/// The longest request line accepted, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// The owner of mappings that come from the configuration file.
pub const CONFIG_OWNER: &str = "config";

/// The answer to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// What happened, or why it failed.
    pub message: String,
    /// The mappings (status, list, after a reload), or the one added.
    #[serde(default)]
    pub mappings: Vec<Row>,
    /// For a hand-over: the names of the sockets that follow, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<String>,
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            mappings: Vec::new(),
            sockets: Vec::new(),
        }
    }

    pub fn ok(message: impl Into<String>, mappings: Vec<Row>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            mappings,
            sockets: Vec::new(),
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Call {
    /// Every mapping with its counters.
    Status,
    /// The same rows as `status` (for tools: the runtime view).
    List,
    /// Re-read the configuration file.
    Reload,
    /// Start the successor (the `berth` binary now at this daemon's path) and hand every
    /// socket and kernel mode's pinned state over to it; answered once it serves them.
    Upgrade,
    /// A successor asks for the sockets ([`super::handover`]); not for clients.
    Handover,
    /// Add a mapping. The listening socket may come along with the line (SCM_RIGHTS);
    /// otherwise the daemon binds.
    Add {
        mapping: Box<Draft>,
        /// Who adds it (`docker`, `cni:<id>:<ifname>`); shown in status. Default `api`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Removed when this connection closes. Default true; ignored with `persist`.
        #[serde(default = "yes")]
        lease: bool,
        /// Kept in the daemon's state file and served again after a restart, until removed
        /// (the CNI plugin's mappings: its process exits at once). Takes no socket. Default
        /// false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        persist: bool,
    },
    /// Remove runtime mappings: one by `name` (the answer comes once its socket is closed),
    /// or every mapping of `owner` (a container that is gone: their connections, flows and
    /// kernel conntrack entries are cut, and the answer comes once they are). Removing an
    /// owner that has none succeeds.
    Remove {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
}

fn yes() -> bool {
    true
}

impl Call {
    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim();
        match line {
            "status" => return Ok(Self::Status),
            "list" => return Ok(Self::List),
            "reload" => return Ok(Self::Reload),
            "upgrade" => return Ok(Self::Upgrade),
            "handover" => return Ok(Self::Handover),
            _ => {}
        }
        if !line.starts_with('{') {
            let shown: String = line.chars().take(64).collect();
            return Err(format!(
                "unknown command {shown:?}: expected status, list, reload, upgrade, or a JSON request such as {{\"op\":\"add\",...}}"
            ));
        }
        serde_json::from_str(line).map_err(|e| format!("invalid request: {e}"))
    }
}

/// Checks an owner string: 1 to 128 printable ASCII characters without spaces.
pub fn check_owner(owner: &str) -> Result<(), String> {
    if owner.is_empty() || owner.len() > 128 || !owner.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "owner {owner:?}: must be 1 to 128 printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// A readable name for a runtime mapping that came without one: owner, protocol, port and
/// address, e.g. `docker-tcp-9091-any`, `docker-udp-53-127.0.0.1`, `cni-tcp-80-v6__1`.
/// `taken` says whether a name is in use; a suffix makes it unique.
pub fn generate_name(
    owner: &str,
    proto: Proto,
    listen: ListenAddr,
    taken: impl Fn(&str) -> bool,
) -> String {
    let who: String = owner
        .split(':')
        .next()
        .unwrap_or("api")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(16)
        .collect();
    let who = if who.is_empty() { "api".into() } else { who };
    let host = match listen.get().ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "any".to_owned(),
        IpAddr::V6(ip) if ip.is_unspecified() => "any6".to_owned(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("v6{}", ip.to_string().replace(':', "_")),
    };
    let base = format!("{who}-{proto}-{}-{host}", listen.get().port());
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_json_requests_parse() {
        assert_eq!(Call::parse("status\n"), Ok(Call::Status));
        assert_eq!(Call::parse(" reload "), Ok(Call::Reload));
        assert_eq!(Call::parse(r#"{"op":"list"}"#), Ok(Call::List));
        let add = Call::parse(
            r#"{"op":"add","owner":"docker","mapping":{"proto":"udp","listen":"0.0.0.0:53","target":"10.0.0.2:53"}}"#,
        )
        .unwrap();
        let Call::Add {
            mapping,
            owner,
            lease,
            persist: false,
        } = add
        else {
            panic!("{add:?}")
        };
        assert_eq!(
            (mapping.proto.as_deref(), owner.as_deref(), lease),
            (Some("udp"), Some("docker"), true)
        );
        assert_eq!(
            Call::parse(r#"{"op":"remove","name":"x"}"#),
            Ok(Call::Remove {
                name: Some("x".into()),
                owner: None
            })
        );
        assert_eq!(
            Call::parse(r#"{"op":"remove","owner":"cni:1:eth0"}"#),
            Ok(Call::Remove {
                name: None,
                owner: Some("cni:1:eth0".into())
            })
        );
    }

    #[test]
    fn garbage_gets_a_reason() {
        let err = |l: &str| Call::parse(l).unwrap_err();
        assert!(err("hello").contains("unknown command \"hello\""));
        assert!(err("{").contains("invalid request"));
        assert!(err(r#"{"op":"explode"}"#).contains("unknown variant"));
        assert!(err(r#"{"op":"add"}"#).contains("missing field `mapping`"));
        assert!(err(r#"{"op":"remove","name":"x","extra":1}"#).contains("unknown field"));
        assert!(
            err(r#"{"op":"add","mapping":{"listen":"0.0.0.0:1","port":3}}"#)
                .contains("unknown field `port`")
        );
        assert!(err(&"x".repeat(1000)).len() < 300);
    }

    #[test]
    fn generated_names_are_readable_valid_and_unique() {
        let l = |s: &str| s.parse::<ListenAddr>().unwrap();
        let free = |_: &str| false;
        assert_eq!(
            generate_name("docker", Proto::Tcp, l("0.0.0.0:9091"), free),
            "docker-tcp-9091-any"
        );
        assert_eq!(
            generate_name("cni:abc:eth0", Proto::Udp, l("[::]:53"), free),
            "cni-udp-53-any6"
        );
        let v6 = generate_name("docker", Proto::Tcp, l("[::1]:80"), free);
        assert_eq!(v6, "docker-tcp-80-v6__1");
        let long = generate_name(
            "x",
            Proto::Tcp,
            l("[fd00:1234:5678:9abc:def0:1234:5678:9abc]:65535"),
            free,
        );
        crate::mapping::spec::check_name(&long).unwrap();
        let taken = |n: &str| n == "docker-tcp-1-any" || n == "docker-tcp-1-any-2";
        assert_eq!(
            generate_name("docker", Proto::Tcp, l("0.0.0.0:1"), taken),
            "docker-tcp-1-any-3"
        );
        assert_eq!(
            generate_name("", Proto::Tcp, l("0.0.0.0:1"), free),
            "api-tcp-1-any"
        );
    }

    #[test]
    fn owners_are_checked() {
        check_owner("cni:0123abcd:eth0").unwrap();
        assert!(check_owner("").is_err());
        assert!(check_owner("two words").is_err());
        assert!(check_owner(&"x".repeat(129)).is_err());
    }
}
