//! The service's configuration file (`/etc/berth/berth.toml`): parsed, then validated as a
//! whole before anything is bound. Every error names the file, the mapping and the field.
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9475"
//!
//! [[mapping]]
//! name = "web"
//! proto = "tcp"            # tcp | udp
//! listen = "0.0.0.0:9091"
//! target = "172.16.1.1:8080"
//! mode = "auto"            # auto | copy | splice | sockmap | dnat
//!
//! [dnat]                     # kernel mode, for mappings with mode = "dnat"
//! interfaces = ["eth0"]      # default: every non-loopback interface that is not a port
//! ```
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    addr::{ListenAddr, Proto, TargetAddr},
    forward,
    relay::Mode,
    udp,
};

/// Where the Prometheus endpoint listens unless the file says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9475";
/// The admin socket unless the file says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/berth/admin.sock";

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `None` when `[metrics] enabled = false`.
    pub metrics_listen: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    /// On SIGTERM, how long established connections may still run.
    pub drain_timeout: Duration,
    /// `[service] sockmap_*`: sizes of the sockmap relay, for mappings in sockmap mode.
    pub sockmap: crate::sockmap::Settings,
    /// `[dnat]`: where and how big kernel mode is, for mappings with `mode = "dnat"`.
    pub dnat: crate::dnat::Settings,
    pub mappings: Vec<MappingSpec>,
}

/// What a mapping asks for; `mode = "auto"` picks the best mode available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModeChoice {
    #[default]
    Auto,
    Copy,
    Splice,
    Sockmap,
    /// Kernel mode: TC and cgroup programs map the port; no relay ([`crate::dnat`]).
    Dnat,
}

impl ModeChoice {
    /// The relay mode for TCP. `auto` is splice for now: the experimental sockmap mode is
    /// slower than splice here for bulk and short connections (see the README's benchmark),
    /// so it is used only when asked for by name.
    pub fn tcp_mode(self) -> Mode {
        match self {
            Self::Copy => Mode::Copy,
            // Dnat has no relay; callers check `is_kernel` first.
            Self::Auto | Self::Splice | Self::Dnat => Mode::Splice,
            Self::Sockmap => Mode::Sockmap,
        }
    }

    /// Whether the mapping is served by the kernel-mode programs instead of a relay.
    pub fn is_kernel(self) -> bool {
        self == Self::Dnat
    }

    /// Whether this mapping needs the sockmap programs.
    pub fn wants_sockmap(self) -> bool {
        self == Self::Sockmap
    }
}

impl std::str::FromStr for ModeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "copy" => Ok(Self::Copy),
            "splice" => Ok(Self::Splice),
            "sockmap" => Ok(Self::Sockmap),
            "dnat" => Ok(Self::Dnat),
            _ => Err(format!(
                "unknown mode {s:?}: expected auto, copy, splice, sockmap or dnat"
            )),
        }
    }
}

impl fmt::Display for ModeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Sockmap => "sockmap",
            Self::Dnat => "dnat",
        })
    }
}

/// One validated `[[mapping]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MappingSpec {
    pub name: String,
    pub proto: Proto,
    pub listen: ListenAddr,
    pub target: TargetAddr,
    pub mode: ModeChoice,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub max_flows: usize,
    pub udp_batch: usize,
}

/// The configuration is unusable; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: mapping {mapping}: {field}: {why}", file.display())]
    Mapping {
        file: PathBuf,
        /// `"web"` (or `#3` when it has no usable name).
        mapping: String,
        field: &'static str,
        why: String,
    },
    #[error("{}: [{section}] {field}: {why}", file.display())]
    Section {
        file: PathBuf,
        section: &'static str,
        field: &'static str,
        why: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    metrics: Option<RawMetrics>,
    admin: Option<RawAdmin>,
    service: Option<RawService>,
    dnat: Option<RawDnat>,
    #[serde(default)]
    mapping: Vec<RawMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    drain_timeout: Option<f64>,
    sockmap_max_entries: Option<i64>,
    sockmap_send_buffer: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnat {
    interfaces: Option<Vec<String>>,
    cgroup: Option<PathBuf>,
    conntrack_entries: Option<i64>,
    tcp_timeout: Option<f64>,
    closing_timeout: Option<f64>,
    udp_timeout: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    name: Option<String>,
    proto: Option<String>,
    listen: Option<String>,
    target: Option<String>,
    mode: Option<String>,
    max_connections: Option<i64>,
    connect_timeout: Option<f64>,
    udp_idle_timeout: Option<f64>,
    max_flows: Option<i64>,
    udp_batch: Option<i64>,
}

impl Config {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Validates `text` as if read from `file` (which only names it in errors).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let section = |section, field, why: String| ConfigError::Section {
            file: file.to_owned(),
            section,
            field,
            why,
        };
        let metrics_listen = match raw.metrics {
            Some(RawMetrics {
                enabled: Some(false),
                ..
            }) => None,
            Some(RawMetrics {
                listen: Some(l), ..
            }) => Some(
                l.parse::<SocketAddr>()
                    .map_err(|_| section("metrics", "listen", bad_addr(&l)))?,
            ),
            _ => DEFAULT_METRICS_LISTEN.parse().ok(),
        };
        let admin_socket = raw
            .admin
            .and_then(|a| a.socket)
            .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into());
        if !admin_socket.is_absolute() {
            return Err(section(
                "admin",
                "socket",
                format!("{} is not an absolute path", admin_socket.display()),
            ));
        }
        let (drain, entries, send_buffer) = raw.service.map_or((None, None, None), |s| {
            (
                s.drain_timeout,
                s.sockmap_max_entries,
                s.sockmap_send_buffer,
            )
        });
        let drain_timeout = match drain {
            Some(v) => secs(v).map_err(|why| section("service", "drain_timeout", why))?,
            None => forward::Config::DEFAULT_DRAIN_TIMEOUT,
        };
        let sockmap_max_entries = match entries {
            None => crate::sockmap::DEFAULT_MAX_ENTRIES,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (2..=16_777_216).contains(n))
                .ok_or_else(|| {
                    section(
                        "service",
                        "sockmap_max_entries",
                        format!("{n} is not a number from 2 to 16777216"),
                    )
                })?,
        };
        let sockmap_send_buffer = match send_buffer {
            None => crate::sockmap::DEFAULT_SEND_BUFFER,
            Some(n) => crate::sockmap::check_send_buffer(n)
                .map_err(|why| section("service", "sockmap_send_buffer", why))?,
        };
        let dnat = match raw.dnat {
            None => crate::dnat::Settings::default(),
            Some(d) => dnat_settings(d).map_err(|(field, why)| section("dnat", field, why))?,
        };
        let mut mappings: Vec<MappingSpec> = Vec::with_capacity(raw.mapping.len());
        for (i, m) in raw.mapping.into_iter().enumerate() {
            let spec = mapping(m, i + 1).map_err(|(mapping, field, why)| ConfigError::Mapping {
                file: file.to_owned(),
                mapping,
                field,
                why,
            })?;
            mappings.push(spec);
        }
        let config = Self {
            metrics_listen,
            admin_socket,
            drain_timeout,
            sockmap: crate::sockmap::Settings {
                max_entries: sockmap_max_entries,
                send_buffer: sockmap_send_buffer,
            },
            dnat,
            mappings,
        };
        config.check_conflicts(file)?;
        Ok(config)
    }

    /// Names are unique, and no two mappings (nor the metrics endpoint) want the same port.
    fn check_conflicts(&self, file: &Path) -> Result<(), ConfigError> {
        let mut names: HashMap<&str, ()> = HashMap::new();
        for (i, m) in self.mappings.iter().enumerate() {
            let err = |field, why| ConfigError::Mapping {
                file: file.to_owned(),
                mapping: format!("{:?}", m.name),
                field,
                why,
            };
            if names.insert(&m.name, ()).is_some() {
                return Err(err("name", "another mapping has the same name".into()));
            }
            if let Some(other) = self.mappings[..i]
                .iter()
                .find(|o| o.proto == m.proto && overlaps(o.listen.get(), m.listen.get()))
            {
                return Err(err(
                    "listen",
                    format!(
                        "{} {} overlaps mapping {:?} ({} {})",
                        m.proto, m.listen, other.name, other.proto, other.listen
                    ),
                ));
            }
            if let Some(metrics) = self.metrics_listen
                && m.proto == Proto::Tcp
                && overlaps(metrics, m.listen.get())
            {
                return Err(err(
                    "listen",
                    format!("{} overlaps the metrics endpoint {metrics}", m.listen),
                ));
            }
        }
        Ok(())
    }
}

/// Two listen addresses clash when the ports match and the addresses are equal, or one is the
/// wildcard of the same family (binding both fails with "address in use").
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    // Port 0 asks the kernel for a free port: never a clash.
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

type FieldError = (String, &'static str, String);

fn mapping(m: RawMapping, index: usize) -> Result<MappingSpec, FieldError> {
    let label = match &m.name {
        Some(n) if !n.is_empty() => format!("{n:?}"),
        _ => format!("#{index}"),
    };
    let err = |field: &'static str, why: String| (label.clone(), field, why);
    let name = m
        .name
        .clone()
        .ok_or_else(|| err("name", "missing".into()))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(err(
            "name",
            "must be 1 to 64 characters of A-Z a-z 0-9 - _ . (it names the mapping in metrics, status and LISTEN_FDNAMES)".into(),
        ));
    }
    let proto: Proto = match &m.proto {
        Some(p) => p.parse().map_err(|e| err("proto", e))?,
        None => Proto::Tcp,
    };
    let listen_text = m.listen.ok_or_else(|| err("listen", "missing".into()))?;
    let listen: ListenAddr = listen_text
        .parse()
        .map_err(|_| err("listen", bad_addr(&listen_text)))?;
    let target_text = m.target.ok_or_else(|| err("target", "missing".into()))?;
    let target: TargetAddr = target_text
        .parse()
        .map_err(|_| err("target", bad_addr(&target_text)))?;
    if target.get().port() == 0 || target.get().ip().is_unspecified() {
        return Err(err(
            "target",
            format!("{target} cannot be connected to (port 0 or an unspecified address)"),
        ));
    }
    let mode = match m.mode.as_deref() {
        None => ModeChoice::Auto,
        Some(v) => v.parse().map_err(|e| err("mode", e))?,
    };
    if proto == Proto::Udp && !matches!(mode, ModeChoice::Auto | ModeChoice::Dnat) {
        return Err(err(
            "mode",
            format!("\"{mode}\" applies to tcp; a udp mapping takes \"auto\" or \"dnat\""),
        ));
    }
    if mode.is_kernel() {
        // The same checks as kernel mode itself, reported under the field.
        let reason = |e: crate::dnat::DnatError| match e {
            crate::dnat::DnatError::Target(m) | crate::dnat::DnatError::Listen(m) => m,
            other => other.to_string(),
        };
        crate::dnat::check_target(target.get()).map_err(|e| err("target", reason(e)))?;
        crate::dnat::check_listen(listen.get()).map_err(|e| err("listen", reason(e)))?;
    }
    let tcp_only = |field: &'static str, set: bool| {
        if set && proto != Proto::Tcp {
            Err(err(field, "applies to tcp mappings only".into()))
        } else {
            Ok(())
        }
    };
    let udp_only = |field: &'static str, set: bool| {
        if set && proto != Proto::Udp {
            Err(err(field, "applies to udp mappings only".into()))
        } else {
            Ok(())
        }
    };
    tcp_only("max_connections", m.max_connections.is_some())?;
    tcp_only("connect_timeout", m.connect_timeout.is_some())?;
    udp_only("udp_idle_timeout", m.udp_idle_timeout.is_some())?;
    udp_only("max_flows", m.max_flows.is_some())?;
    udp_only("udp_batch", m.udp_batch.is_some())?;
    let positive = |field: &'static str, v: Option<i64>, default: usize, max: usize| match v {
        None => Ok(default),
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| err(field, format!("{n} is not a number from 1 to {max}"))),
    };
    let seconds = |field: &'static str, v: Option<f64>, default: Duration| match v {
        None => Ok(default),
        Some(v) => secs(v).map_err(|why| err(field, why)),
    };
    Ok(MappingSpec {
        max_connections: positive(
            "max_connections",
            m.max_connections,
            forward::Config::DEFAULT_MAX_CONNECTIONS,
            10_000_000,
        )?,
        connect_timeout: seconds(
            "connect_timeout",
            m.connect_timeout,
            forward::Config::DEFAULT_CONNECT_TIMEOUT,
        )?,
        udp_idle_timeout: seconds(
            "udp_idle_timeout",
            m.udp_idle_timeout,
            udp::DEFAULT_IDLE_TIMEOUT,
        )?,
        max_flows: positive(
            "max_flows",
            m.max_flows,
            udp::Config::DEFAULT_MAX_FLOWS,
            10_000_000,
        )?,
        udp_batch: positive(
            "udp_batch",
            m.udp_batch,
            udp::Config::DEFAULT_BATCH,
            udp::Config::MAX_BATCH,
        )?,
        name,
        proto,
        listen,
        target,
        mode,
    })
}

fn dnat_settings(d: RawDnat) -> Result<crate::dnat::Settings, (&'static str, String)> {
    let mut out = crate::dnat::Settings::default();
    if let Some(names) = d.interfaces {
        if let Some(bad) = names
            .iter()
            .find(|n| n.parse::<crate::net::IfName>().is_err())
        {
            return Err(("interfaces", format!("{bad:?} is not an interface name")));
        }
        out.interfaces = Some(names);
    }
    if let Some(p) = d.cgroup {
        if !p.is_absolute() {
            return Err(("cgroup", format!("{} is not an absolute path", p.display())));
        }
        out.cgroup = Some(p);
    }
    if let Some(n) = d.conntrack_entries {
        out.conntrack_entries = u32::try_from(n)
            .ok()
            .filter(|n| (1..=16_777_216).contains(n))
            .ok_or_else(|| {
                (
                    "conntrack_entries",
                    format!("{n} is not a number from 1 to 16777216"),
                )
            })?;
    }
    for (field, v, slot) in [
        ("tcp_timeout", d.tcp_timeout, &mut out.timeouts.tcp),
        (
            "closing_timeout",
            d.closing_timeout,
            &mut out.timeouts.closing,
        ),
        ("udp_timeout", d.udp_timeout, &mut out.timeouts.udp),
    ] {
        if let Some(v) = v {
            *slot = secs(v).map_err(|why| (field, why))?;
        }
    }
    Ok(out)
}

fn bad_addr(s: &str) -> String {
    format!("invalid address {s:?}: expected IP:PORT, such as 0.0.0.0:9090 or [::1]:9090")
}

fn secs(v: f64) -> Result<Duration, String> {
    if v.is_finite() && (0.0..1e9).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("{v} is not a number of seconds"))
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
