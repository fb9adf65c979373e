//! What a CNI runtime hands the plugin, free of I/O: the command and its environment, the
//! network configuration on stdin (with `prevResult` and `runtimeConfig.portMappings`), and
//! the mappings they ask for, as runtime API drafts.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    addr::{ListenAddr, Proto, TargetAddr},
    mapping::{Draft, ModeChoice},
};

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The version the runtime's configuration names (for VERSION's answer and error objects,
/// even when the rest does not parse); the newest supported if it names none.
pub fn asked_version(input: &[u8]) -> String {
    serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].into())
}

/// The spec's error codes that this plugin uses (1-99 are the spec's own; 100 and up are
/// the plugin's).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const BAD_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The daemon refused a mapping (a port in use, kernel mode unavailable...).
    pub const REFUSED: u32 = 100;
    /// CHECK: a mapping is missing or not served as asked.
    pub const CHECK_FAILED: u32 = 101;
}

/// The spec's error result, printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}{}", if .details.is_empty() { String::new() } else { format!(": {}", .details) })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl std::str::FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::new(
                    code::BAD_ENV,
                    "unknown CNI_COMMAND",
                    format!("{other:?}: expected ADD, DEL, CHECK, GC, STATUS or VERSION"),
                ));
            }
        })
    }
}

/// The attachment a command is about: `CNI_CONTAINERID` and `CNI_IFNAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// From the environment (`get` reads a variable); ADD, DEL and CHECK need both.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let need = |k: &str| {
            get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
                CniError::new(
                    code::BAD_ENV,
                    format!("{k} is not set"),
                    "the runtime must set it",
                )
            })
        };
        Ok(Self {
            container_id: need("CNI_CONTAINERID")?,
            ifname: need("CNI_IFNAME")?,
        })
    }

    /// The owner of this attachment's mappings in the daemon.
    pub fn owner(&self) -> String {
        format!("{OWNER_PREFIX}{}:{}", self.container_id, self.ifname)
    }
}

/// Every CNI owner starts so (GC looks only at these).
pub const OWNER_PREFIX: &str = "cni:";

/// One `runtimeConfig.portMappings` entry (portmap's `PortMapEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u32,
    pub container_port: u32,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration on stdin. Unknown keys are tolerated: runtimes add their own
/// (Podman 4.3 passes `capabilities` here).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// berth: how the ports are served (default `dnat`: kernel mode).
    #[serde(default)]
    pub mode: Option<String>,
    /// berth: whether the daemon also binds the port and relays what kernel mode passes
    /// (default false in kernel mode: no socket, like portmap; the runtime may hold the port).
    #[serde(default)]
    pub relay: Option<bool>,
    /// berth: the daemon's admin socket.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// berth: the daemon's state file, for a DEL while the daemon is down (default: beside
    /// the admin socket, as the daemon's own default).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

impl NetConf {
    /// Parses stdin and checks the version.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {:?}", conf.cni_version),
                format!("berth-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// The mode asked for, checked.
    pub fn mode(&self) -> Result<ModeChoice, CniError> {
        match &self.mode {
            None => Ok(ModeChoice::Dnat),
            Some(m) => m
                .parse()
                .map_err(|e| CniError::new(code::INVALID_CONFIG, "mode", e)),
        }
    }

    /// The mappings this attachment asks for. `hostIP` unset: `0.0.0.0` to the container's
    /// IPv4 address and `[::]` to its IPv6 address, or to its IPv4 address if it has none
    /// (so that `::1` reaches an IPv4 container). `hostIP` set: its family's container
    /// address (IPv4 for an IPv6 host address if need be). A mapping no container address
    /// fits, or a port mapped twice, is an error.
    pub fn drafts(&self, ifname: &str) -> Result<Vec<Draft>, CniError> {
        let mode = self.mode()?;
        let relay = self.relay.unwrap_or(!mode.is_kernel());
        let ips = match &self.prev_result {
            Some(prev) => container_ips(prev, ifname),
            None if self.runtime_config.port_mappings.is_empty() => Vec::new(),
            None => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "berth-cni is a chained plugin: put it after the plugin that gives the container its addresses",
                ));
            }
        };
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for pm in &self.runtime_config.port_mappings {
            let bad = |why: String| CniError::new(code::INVALID_CONFIG, "portMappings", why);
            let proto: Proto = pm.protocol.to_ascii_lowercase().parse().map_err(|_| {
                bad(format!(
                    "protocol {:?}: berth maps tcp and udp",
                    pm.protocol
                ))
            })?;
            let port = |p: u32, what: &str| {
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("{what} {p} is not a port from 1 to 65535")))
            };
            let host_port = port(pm.host_port, "hostPort")?;
            let container_port = port(pm.container_port, "containerPort")?;
            let host_ip: Option<IpAddr> =
                if pm.host_ip.is_empty() {
                    None
                } else {
                    Some(pm.host_ip.parse().map_err(|_| {
                        bad(format!("hostIP {:?} is not an IP address", pm.host_ip))
                    })?)
                };
            let v4 = ips.iter().find(|ip| ip.is_ipv4());
            let v6 = ips.iter().find(|ip| ip.is_ipv6());
            // IPv6 clients may reach an IPv4-only container (as through docker-proxy); IPv4
            // clients cannot reach an IPv6-only one.
            let pairs: Vec<(IpAddr, IpAddr)> = match host_ip {
                None => [
                    v4.map(|t| (IpAddr::V4(Ipv4Addr::UNSPECIFIED), *t)),
                    v6.or(v4).map(|t| (IpAddr::V6(Ipv6Addr::UNSPECIFIED), *t)),
                ]
                .into_iter()
                .flatten()
                .collect(),
                Some(h @ IpAddr::V4(_)) => v4.map(|t| (h, *t)).into_iter().collect(),
                Some(h @ IpAddr::V6(_)) => v6.or(v4).map(|t| (h, *t)).into_iter().collect(),
            };
            let fitted = !pairs.is_empty();
            for (listen_ip, ip) in pairs {
                if !seen.insert((proto, listen_ip, host_port)) {
                    return Err(bad(format!(
                        "{listen_ip} port {host_port}/{proto} is mapped twice"
                    )));
                }
                let listen = ListenAddr::from(SocketAddr::new(listen_ip, host_port));
                let target = TargetAddr::from(SocketAddr::new(ip, container_port));
                let mut d = Draft::new(proto, listen, target);
                d.mode = Some(mode.to_string());
                d.relay = Some(relay);
                out.push(d);
            }
            if !fitted {
                return Err(bad(format!(
                    "{host_port}/{proto}: the container has no address on {ifname} of the family of hostIP {:?}",
                    pm.host_ip
                )));
            }
        }
        Ok(out)
    }
}

/// The container's addresses on `ifname`, from a 0.4.0 or 1.x result: those of `ips` whose
/// `interface` is that interface inside the sandbox (all of them if no entry says).
pub fn container_ips(prev: &Value, ifname: &str) -> Vec<IpAddr> {
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    let ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours = |idx: Option<u64>| -> bool {
        let (Some(idx), Some(list)) = (idx, interfaces) else {
            return true;
        };
        list.get(usize::try_from(idx).unwrap_or(usize::MAX))
            .is_some_and(|i| {
                i.get("name").and_then(Value::as_str) == Some(ifname)
                    && i.get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            })
    };
    ips.iter()
        .filter(|ip| ours(ip.get("interface").and_then(Value::as_u64)))
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// What ADD prints: `prevResult`, unchanged but for the version asked for.
pub fn add_result(conf: &NetConf) -> Value {
    let mut v = conf
        .prev_result
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:bb"},{"name":"veth1","mac":"cc"},{"name":"eth0","mac":"dd","sandbox":"/run/netns/c"}],"ips":[{"address":"10.88.0.5/16","gateway":"10.88.0.1","interface":2},{"address":"fd00::5/64","interface":2},{"address":"192.168.9.9/24","interface":1}]}"#;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(
            format!(
                r#"{{"cniVersion":"1.0.0","name":"podman","type":"berth-cni","capabilities":{{"portMappings":true}},"prevResult":{PREV}{extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn container_addresses_come_from_the_interface_in_the_sandbox() {
        let prev: Value = serde_json::from_str(PREV).unwrap();
        let ips = container_ips(&prev, "eth0");
        assert_eq!(
            ips,
            vec![
                "10.88.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(container_ips(&prev, "eth1").is_empty());
        // 0.4.0-style results without interface indexes: every address.
        let old: Value =
            serde_json::from_str(r#"{"ips":[{"version":"4","address":"10.0.0.2/24"}]}"#).unwrap();
        assert_eq!(
            container_ips(&old, "eth0"),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn port_mappings_become_one_draft_per_family() {
        let c = conf(
            r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"},{"hostPort":9999,"containerPort":9999,"protocol":"udp","hostIP":"127.0.0.1"}]}"#,
        );
        let d = c.drafts("eth0").unwrap();
        let got: Vec<(String, String, String)> = d
            .iter()
            .map(|d| {
                (
                    d.proto.clone().unwrap(),
                    d.listen.clone().unwrap(),
                    d.target.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("tcp".into(), "0.0.0.0:8080".into(), "10.88.0.5:80".into()),
                ("tcp".into(), "[::]:8080".into(), "[fd00::5]:80".into()),
                (
                    "udp".into(),
                    "127.0.0.1:9999".into(),
                    "10.88.0.5:9999".into()
                ),
            ]
        );
        assert!(
            d.iter()
                .all(|d| d.mode.as_deref() == Some("dnat") && d.relay == Some(false))
        );
    }

    #[test]
    fn the_config_may_choose_a_relay() {
        let c = conf(
            r#","mode":"splice","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":2}]}"#,
        );
        let d = c.drafts("eth0").unwrap();
        assert_eq!(
            (d[0].mode.as_deref(), d[0].relay),
            (Some("splice"), Some(true))
        );
        let c = conf(
            r#","relay":true,"runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":2}]}"#,
        );
        assert_eq!(c.drafts("eth0").unwrap()[0].relay, Some(true));
    }

    #[test]
    fn bad_input_gets_the_spec_codes() {
        let e = NetConf::parse(br#"{"cniVersion":"0.3.1"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, code::DECODE);
        let bad = |extra: &str| conf(extra).drafts("eth0").unwrap_err();
        let e = bad(
            r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}"#,
        );
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("sctp"), "{e}");
        let e = bad(r#","runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80}]}"#);
        assert!(e.details.contains("70000"), "{e}");
        let e = bad(
            r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80},{"hostPort":80,"containerPort":81}]}"#,
        );
        assert!(e.details.contains("mapped twice"), "{e}");
        let e = bad(
            r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"hostIP":"nope"}]}"#,
        );
        assert!(e.details.contains("nope"), "{e}");
        assert_eq!(bad(r#","mode":"warp""#).code, code::INVALID_CONFIG);
        let no_prev = NetConf::parse(
            br#"{"cniVersion":"1.1.0","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":1}]}}"#,
        )
        .unwrap();
        assert!(
            no_prev
                .drafts("eth0")
                .unwrap_err()
                .details
                .contains("chained")
        );
        assert_eq!(
            "EXPLODE".parse::<Command>().unwrap_err().code,
            code::BAD_ENV
        );
        let e = Attachment::from_env(|_| None).unwrap_err();
        assert_eq!(e.code, code::BAD_ENV);
    }

    #[test]
    fn the_example_conflist_configures_the_plugin() {
        let list: Value =
            serde_json::from_str(include_str!("../../../deploy/cni/87-podman-berth.conflist"))
                .unwrap();
        let entry = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "berth-cni")
            .unwrap();
        // A runtime sends each plugin its entry with the list's version and name.
        let mut conf = entry.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let c = NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(c.mode().unwrap(), ModeChoice::Dnat);
        assert_eq!(entry["capabilities"]["portMappings"], true);
    }

    #[test]
    fn add_passes_the_previous_result_through() {
        let c = conf("");
        let out = add_result(&c);
        let prev: Value = serde_json::from_str(PREV).unwrap();
        assert_eq!(out, prev);
        let err = serde_json::to_value(CniError::new(7, "m", "")).unwrap();
        assert_eq!(err, serde_json::json!({"code":7,"msg":"m"}));
    }
}
