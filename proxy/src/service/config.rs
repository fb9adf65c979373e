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
//! [defaults]                 # for every mapping that does not say, runtime ones too
//! mode = "auto"
//!
//! [dnat]                     # kernel mode, for mappings with mode = "dnat"
//! interfaces = ["eth0"]      # default: every non-loopback interface that is not a port
//! ```
//!
//! Each `[[mapping]]` is a [`Draft`], validated by [`Draft::resolve`] as every front end's
//! mappings are.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    addr::Proto,
    forward,
    mapping::{Defaults, Draft, Options, Spec, spec::bad_addr, spec::secs},
};

/// Where the Prometheus endpoint listens unless the file says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9475";
/// The admin socket unless the file, `--admin-socket` or `BERTH_ADMIN_SOCKET` says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/berth/admin.sock";
/// The environment variable that names the admin socket, for every `berth` command and for
/// `berth-docker-proxy`.
pub const ADMIN_SOCKET_ENV: &str = "BERTH_ADMIN_SOCKET";
/// Where the daemon keeps its persistent runtime mappings unless `[admin] state_file` says
/// otherwise: beside its admin socket (`admin.sock` → `admin.state.json`). The CNI plugin
/// looks there too, for a DEL while the daemon is down.
pub fn default_state_file(admin_socket: &Path) -> PathBuf {
    admin_socket.with_extension("state.json")
}

/// How many mappings the runtime API may add unless `[admin] max_runtime_mappings` says.
pub const DEFAULT_MAX_RUNTIME_MAPPINGS: usize = 4096;

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
    /// `[dnat]`: where and how big kernel mode is, for mappings with `mode = "dnat"`. Its
    /// pin directory is the file's; see [`Config::dnat_for`] for the one used.
    pub dnat: crate::dnat::Settings,
    /// `[dnat] pin_dir` is not set: the daemon pins under a directory named after its admin
    /// socket.
    pub dnat_pin_default: bool,
    /// `[defaults]`: what every mapping that does not set a field gets, runtime ones too.
    pub defaults: Defaults,
    /// `[admin] max_runtime_mappings`: how many mappings the runtime API may add.
    pub max_runtime_mappings: usize,
    /// `[admin] state_file`: where persistent runtime mappings are kept; by default beside
    /// the admin socket (`admin.sock` → `admin.state.json`).
    pub state_file: Option<PathBuf>,
    pub mappings: Vec<Spec>,
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
    defaults: Option<Options>,
    #[serde(default)]
    mapping: Vec<Draft>,
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
    max_runtime_mappings: Option<i64>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    drain_timeout: Option<f64>,
    sockmap_max_entries: Option<i64>,
    sockmap_send_buffer: Option<i64>,
    sockmap_promote_bytes: Option<i64>,
    sockmap_promote_after: Option<f64>,
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
    pin_dir: Option<PathBuf>,
}

impl Config {
    /// Kernel mode's settings for the daemon whose admin socket is `admin`: with the default
    /// pin directory, named after that socket, unless the file set one (or none).
    pub fn dnat_for(&self, admin: &Path) -> crate::dnat::Settings {
        let mut s = self.dnat.clone();
        if self.dnat_pin_default {
            s.pin_dir = Some(crate::dnat::pin::default_dir(admin));
        }
        s
    }

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
        let (admin_socket, max_runtime, state_file) = raw.admin.map_or((None, None, None), |a| {
            (a.socket, a.max_runtime_mappings, a.state_file)
        });
        if let Some(f) = state_file.as_ref().filter(|f| !f.is_absolute()) {
            return Err(section(
                "admin",
                "state_file",
                format!("{} is not an absolute path", f.display()),
            ));
        }
        let admin_socket = admin_socket.unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into());
        let max_runtime_mappings = match max_runtime {
            None => DEFAULT_MAX_RUNTIME_MAPPINGS,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= 65_536)
                .ok_or_else(|| {
                    section(
                        "admin",
                        "max_runtime_mappings",
                        format!("{n} is not a number from 0 to 65536"),
                    )
                })?,
        };
        if !admin_socket.is_absolute() {
            return Err(section(
                "admin",
                "socket",
                format!("{} is not an absolute path", admin_socket.display()),
            ));
        }
        let (drain, entries, send_buffer, promote_bytes, promote_after) =
            raw.service.map_or((None, None, None, None, None), |s| {
                (
                    s.drain_timeout,
                    s.sockmap_max_entries,
                    s.sockmap_send_buffer,
                    s.sockmap_promote_bytes,
                    s.sockmap_promote_after,
                )
            });
        let default_promote = crate::relay::Threshold::DEFAULT;
        let promote = crate::relay::Threshold {
            bytes: match promote_bytes {
                None => default_promote.bytes,
                Some(n) => u64::try_from(n).map_err(|_| {
                    section(
                        "service",
                        "sockmap_promote_bytes",
                        format!("{n} is not a number of bytes (0 or more)"),
                    )
                })?,
            },
            age: match promote_after {
                None => default_promote.age,
                Some(v) => {
                    secs(v).map_err(|why| section("service", "sockmap_promote_after", why))?
                }
            },
        };
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
        let dnat_pin_default = raw.dnat.as_ref().is_none_or(|d| d.pin_dir.is_none());
        let dnat = match raw.dnat {
            None => crate::dnat::Settings::default(),
            Some(d) => dnat_settings(d).map_err(|(field, why)| section("dnat", field, why))?,
        };
        let defaults = Defaults::new(raw.defaults.unwrap_or_default())
            .map_err(|e| section("defaults", e.field, e.why))?;
        let mut mappings: Vec<Spec> = Vec::with_capacity(raw.mapping.len());
        for (i, m) in raw.mapping.iter().enumerate() {
            let spec = m.resolve(&defaults).map_err(|e| ConfigError::Mapping {
                file: file.to_owned(),
                mapping: match &m.name {
                    Some(n) if !n.is_empty() => format!("{n:?}"),
                    _ => format!("#{}", i + 1),
                },
                field: e.field,
                why: e.why,
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
                promote,
            },
            dnat,
            dnat_pin_default,
            defaults,
            max_runtime_mappings,
            state_file,
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
            if let Some(why) = clash(m, &self.mappings[..i], self.metrics_listen) {
                return Err(err("listen", why));
            }
        }
        Ok(())
    }
}

/// Whether `m` clashes with the metrics endpoint or with one of `others` (same protocol,
/// overlapping address); the message says with what.
pub(crate) fn clash<'a>(
    m: &Spec,
    others: impl IntoIterator<Item = &'a Spec>,
    metrics: Option<SocketAddr>,
) -> Option<String> {
    if let Some(other) = others
        .into_iter()
        .find(|o| o.proto == m.proto && overlaps(o.listen.get(), m.listen.get()))
    {
        return Some(format!(
            "{} {} overlaps mapping {:?} ({} {})",
            m.proto, m.listen, other.name, other.proto, other.listen
        ));
    }
    match metrics {
        Some(metrics) if m.proto == Proto::Tcp && overlaps(metrics, m.listen.get()) => Some(
            format!("{} overlaps the metrics endpoint {metrics}", m.listen),
        ),
        _ => None,
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
    match d.pin_dir {
        // Unset: the daemon's default, resolved with its admin socket; empty: not pinned.
        None => {}
        Some(p) if p.as_os_str().is_empty() => {}
        Some(p) if !p.is_absolute() => {
            return Err((
                "pin_dir",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        Some(p) => out.pin_dir = Some(p),
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

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
