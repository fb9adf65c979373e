//! What a mapping is: its [`Spec`], and the one validator ([`Draft::resolve`]) that turns what
//! a front end was given (a `[[mapping]]` table, a runtime API request, `berth forward`'s
//! flags, docker-proxy's command line) into a `Spec`, or into an error that names the field.
use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    addr::{ListenAddr, Proto, TargetAddr},
    forward,
    relay::Mode,
    udp,
};

/// What a mapping asks for; `auto` picks the best mode available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModeChoice {
    #[default]
    Auto,
    Copy,
    Splice,
    Sockmap,
    /// Kernel mode: TC and cgroup programs map the port ([`crate::dnat`]); a relay serves
    /// whatever they pass through (hairpin, fragments, unmapped families).
    Dnat,
}

impl ModeChoice {
    /// The user-space relay mode for TCP, or `None` for sockmap (the kernel relays, with the
    /// maps a mapping gets when it starts). `auto` splices, and hands long connections to the
    /// kernel relay where its programs loaded (`Pump::Auto`, chosen when the mapping starts).
    /// Kernel mode's relay splices.
    pub fn relay_mode(self) -> Option<Mode> {
        match self {
            Self::Copy => Some(Mode::Copy),
            Self::Auto | Self::Splice | Self::Dnat => Some(Mode::Splice),
            Self::Sockmap => None,
        }
    }

    /// Whether the kernel-mode programs map the port.
    pub fn is_kernel(self) -> bool {
        self == Self::Dnat
    }

    /// Whether this mapping needs the sockmap programs.
    pub fn wants_sockmap(self) -> bool {
        self == Self::Sockmap
    }

    /// Whether a mapping of `proto` can be served this way (the relay modes are TCP's).
    pub fn fits(self, proto: Proto) -> bool {
        proto == Proto::Tcp || matches!(self, Self::Auto | Self::Dnat)
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

/// One validated mapping.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub proto: Proto,
    pub listen: ListenAddr,
    pub target: TargetAddr,
    pub mode: ModeChoice,
    /// TCP: connections relayed at once; clients beyond it are reset.
    pub max_connections: usize,
    /// TCP: how long to wait for the target to accept.
    pub connect_timeout: Duration,
    /// TCP: connections one client address may hold at once (`None`: no cap but
    /// `max_connections`); clients beyond it are reset at once.
    pub max_connections_per_client: Option<usize>,
    /// TCP: a connection that moves no byte either way for this long is reset (`None`: never,
    /// as docker-proxy).
    pub tcp_idle_timeout: Option<Duration>,
    /// UDP: a flow idle this long closes.
    pub udp_idle_timeout: Duration,
    /// UDP: flows open at once; a new client beyond it evicts a flow (see [`udp::flows`]).
    pub max_flows: usize,
    /// UDP: datagrams per system call.
    pub udp_batch: usize,
    /// UDP: segmentation offload (UDP_GRO in, UDP_SEGMENT out) where the kernel has it.
    pub udp_offload: bool,
    /// Whether berth binds the port and relays what the kernel programs pass through. Only
    /// kernel mode may do without (`relay = false`): the port is then mapped in the kernel
    /// alone, as CNI's portmap maps it, and stays free for a runtime that reserves it.
    pub relay: bool,
}

impl Spec {
    /// Upper bound of `max_connections` and `max_flows`.
    pub const MAX_COUNT: usize = 10_000_000;
}

/// A mapping as a front end received it: every field optional and still unchecked. It is the
/// `[[mapping]]` table of the configuration file and the `mapping` object of a runtime API
/// request, field for field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Draft {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_batch: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_offload: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<bool>,
}

/// The fields a mapping may leave to `[defaults]` (serde cannot flatten them into [`Draft`]
/// and still refuse unknown fields, so they are listed twice).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_batch: Option<i64>,
}

/// A field of a mapping is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct FieldError {
    /// The field's name as the file and the runtime API spell it (`max_connections`).
    pub field: &'static str,
    pub why: String,
}

impl FieldError {
    fn new(field: &'static str, why: impl Into<String>) -> Self {
        Self {
            field,
            why: why.into(),
        }
    }

    /// The field as `berth forward` spells it: `--max-connections`, or `LISTEN`.
    pub fn flag(&self) -> String {
        match self.field {
            "listen" | "target" => self.field.to_uppercase(),
            "relay" => "--no-relay".to_owned(),
            "udp_offload" => "--no-udp-offload".to_owned(),
            f => format!("--{}", f.replace('_', "-")),
        }
    }
}

/// `[defaults]`, validated: what a mapping that does not set a field gets. A default applies
/// only where it fits: TCP options to TCP mappings, UDP options to UDP mappings, and a relay
/// mode (copy, splice, sockmap) to TCP mappings only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Defaults {
    options: Options,
}

impl Defaults {
    /// Checks every field of `options` on its own (as for a mapping of the protocol the field
    /// belongs to).
    pub fn new(options: Options) -> Result<Self, FieldError> {
        for proto in [Proto::Tcp, Proto::Udp] {
            let mine = Self::only_for(&options, proto);
            check_options(&mine, proto)?;
        }
        Ok(Self { options })
    }

    /// The default mode, if `[defaults]` sets one.
    pub fn mode(&self) -> Option<ModeChoice> {
        self.options.mode.as_deref().and_then(|m| m.parse().ok())
    }

    /// The subset of `options` that applies to a `proto` mapping.
    fn only_for(options: &Options, proto: Proto) -> Options {
        let tcp = proto == Proto::Tcp;
        let mode = options.mode.clone().filter(|m| {
            m.parse::<ModeChoice>()
                .map_or(true, |choice| choice.fits(proto))
        });
        Options {
            mode,
            max_connections: options.max_connections.filter(|_| tcp),
            connect_timeout: options.connect_timeout.filter(|_| tcp),
            max_connections_per_client: options.max_connections_per_client.filter(|_| tcp),
            tcp_idle_timeout: options.tcp_idle_timeout.filter(|_| tcp),
            udp_idle_timeout: options.udp_idle_timeout.filter(|_| !tcp),
            max_flows: options.max_flows.filter(|_| !tcp),
            udp_batch: options.udp_batch.filter(|_| !tcp),
        }
    }
}

impl Draft {
    /// A draft of `proto` from `listen` to `target`, everything else left to the defaults.
    pub fn new(proto: Proto, listen: ListenAddr, target: TargetAddr) -> Self {
        Self {
            proto: Some(proto.to_string()),
            listen: Some(listen.to_string()),
            target: Some(target.to_string()),
            ..Self::default()
        }
    }

    /// The fields that `[defaults]` could also set.
    pub fn options(&self) -> Options {
        Options {
            mode: self.mode.clone(),
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            max_connections_per_client: self.max_connections_per_client,
            tcp_idle_timeout: self.tcp_idle_timeout,
            udp_idle_timeout: self.udp_idle_timeout,
            max_flows: self.max_flows,
            udp_batch: self.udp_batch,
        }
    }

    /// The one validator: the same draft gets the same answer from every front end.
    pub fn resolve(&self, defaults: &Defaults) -> Result<Spec, FieldError> {
        let name = self
            .name
            .clone()
            .ok_or_else(|| FieldError::new("name", "missing"))?;
        check_name(&name)?;
        let proto: Proto = match &self.proto {
            Some(p) => p.parse().map_err(|e| FieldError::new("proto", e))?,
            None => Proto::Tcp,
        };
        let listen: ListenAddr = parse_addr("listen", self.listen.as_deref())?;
        let target: TargetAddr = parse_addr("target", self.target.as_deref())?;
        if target.get().port() == 0 || target.get().ip().is_unspecified() {
            return Err(FieldError::new(
                "target",
                format!("{target} cannot be connected to (port 0 or an unspecified address)"),
            ));
        }
        let own = self.options();
        check_protocol_fit(&own, proto)?;
        let defaults = Defaults::only_for(&defaults.options, proto);
        let merged = merge(&own, &defaults);
        let checked = check_options(&merged, proto)?;
        if self.udp_offload.is_some() && proto != Proto::Udp {
            return Err(FieldError::new(
                "udp_offload",
                "applies to udp mappings only",
            ));
        }
        let relay = self.relay.unwrap_or(true);
        if !relay && !checked.mode.is_kernel() {
            return Err(FieldError::new(
                "relay",
                format!(
                    "false applies to mode \"dnat\" only (mode \"{}\" is a relay)",
                    checked.mode
                ),
            ));
        }
        if checked.mode.is_kernel() {
            // The same checks as kernel mode itself, reported under the field.
            let reason = |e: crate::dnat::DnatError| match e {
                crate::dnat::DnatError::Target(m) | crate::dnat::DnatError::Listen(m) => m,
                other => other.to_string(),
            };
            crate::dnat::check_target(target.get())
                .map_err(|e| FieldError::new("target", reason(e)))?;
            crate::dnat::check_listen(listen.get())
                .map_err(|e| FieldError::new("listen", reason(e)))?;
        }
        Ok(Spec {
            name,
            proto,
            listen,
            target,
            mode: checked.mode,
            max_connections: checked.max_connections,
            connect_timeout: checked.connect_timeout,
            max_connections_per_client: checked.max_connections_per_client,
            tcp_idle_timeout: checked.tcp_idle_timeout,
            udp_idle_timeout: checked.udp_idle_timeout,
            max_flows: checked.max_flows,
            udp_batch: checked.udp_batch,
            udp_offload: self.udp_offload.unwrap_or(true),
            relay,
        })
    }
}

/// Names label metrics, status rows and LISTEN_FDNAMES entries.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(FieldError::new(
            "name",
            "must be 1 to 64 characters of A-Z a-z 0-9 - _ . (it names the mapping in metrics, status and LISTEN_FDNAMES)",
        ));
    }
    Ok(())
}

fn parse_addr<A: std::str::FromStr>(
    field: &'static str,
    text: Option<&str>,
) -> Result<A, FieldError> {
    let text = text.ok_or_else(|| FieldError::new(field, "missing"))?;
    text.parse()
        .map_err(|_| FieldError::new(field, bad_addr(text)))
}

/// The message for an address that does not parse.
pub fn bad_addr(s: &str) -> String {
    format!("invalid address {s:?}: expected IP:PORT, such as 0.0.0.0:9090 or [::1]:9090")
}

/// A mapping's own fields must fit its protocol (defaults are filtered instead).
fn check_protocol_fit(o: &Options, proto: Proto) -> Result<(), FieldError> {
    if let Some(mode) = o.mode.as_deref().and_then(|m| m.parse::<ModeChoice>().ok())
        && !mode.fits(proto)
    {
        return Err(FieldError::new(
            "mode",
            format!("\"{mode}\" applies to tcp; a udp mapping takes \"auto\" or \"dnat\""),
        ));
    }
    let only = |field: &'static str, set: bool, want: Proto| {
        if set && proto != want {
            Err(FieldError::new(
                field,
                format!("applies to {want} mappings only"),
            ))
        } else {
            Ok(())
        }
    };
    only("max_connections", o.max_connections.is_some(), Proto::Tcp)?;
    only("connect_timeout", o.connect_timeout.is_some(), Proto::Tcp)?;
    only(
        "max_connections_per_client",
        o.max_connections_per_client.is_some(),
        Proto::Tcp,
    )?;
    only("tcp_idle_timeout", o.tcp_idle_timeout.is_some(), Proto::Tcp)?;
    only("udp_idle_timeout", o.udp_idle_timeout.is_some(), Proto::Udp)?;
    only("max_flows", o.max_flows.is_some(), Proto::Udp)?;
    only("udp_batch", o.udp_batch.is_some(), Proto::Udp)
}

fn merge(own: &Options, defaults: &Options) -> Options {
    Options {
        mode: own.mode.clone().or_else(|| defaults.mode.clone()),
        max_connections: own.max_connections.or(defaults.max_connections),
        connect_timeout: own.connect_timeout.or(defaults.connect_timeout),
        max_connections_per_client: own
            .max_connections_per_client
            .or(defaults.max_connections_per_client),
        tcp_idle_timeout: own.tcp_idle_timeout.or(defaults.tcp_idle_timeout),
        udp_idle_timeout: own.udp_idle_timeout.or(defaults.udp_idle_timeout),
        max_flows: own.max_flows.or(defaults.max_flows),
        udp_batch: own.udp_batch.or(defaults.udp_batch),
    }
}

struct Checked {
    mode: ModeChoice,
    max_connections: usize,
    connect_timeout: Duration,
    max_connections_per_client: Option<usize>,
    tcp_idle_timeout: Option<Duration>,
    udp_idle_timeout: Duration,
    max_flows: usize,
    udp_batch: usize,
}

fn check_options(o: &Options, proto: Proto) -> Result<Checked, FieldError> {
    let mode = match o.mode.as_deref() {
        None => ModeChoice::Auto,
        Some(v) => v.parse().map_err(|e| FieldError::new("mode", e))?,
    };
    if !mode.fits(proto) {
        return Err(FieldError::new(
            "mode",
            format!("\"{mode}\" applies to tcp; a udp mapping takes \"auto\" or \"dnat\""),
        ));
    }
    Ok(Checked {
        mode,
        max_connections: count(
            "max_connections",
            o.max_connections,
            forward::Config::DEFAULT_MAX_CONNECTIONS,
            Spec::MAX_COUNT,
        )?,
        connect_timeout: seconds(
            "connect_timeout",
            o.connect_timeout,
            forward::Config::DEFAULT_CONNECT_TIMEOUT,
        )?,
        max_connections_per_client: o
            .max_connections_per_client
            .map(|n| count("max_connections_per_client", Some(n), 0, Spec::MAX_COUNT))
            .transpose()?,
        tcp_idle_timeout: idle_timeout(o.tcp_idle_timeout)?,
        udp_idle_timeout: seconds(
            "udp_idle_timeout",
            o.udp_idle_timeout,
            udp::DEFAULT_IDLE_TIMEOUT,
        )?,
        max_flows: count(
            "max_flows",
            o.max_flows,
            udp::Config::DEFAULT_MAX_FLOWS,
            Spec::MAX_COUNT,
        )?,
        udp_batch: count(
            "udp_batch",
            o.udp_batch,
            udp::Config::DEFAULT_BATCH,
            udp::Config::MAX_BATCH,
        )?,
    })
}

fn count(
    field: &'static str,
    v: Option<i64>,
    default: usize,
    max: usize,
) -> Result<usize, FieldError> {
    match v {
        None => Ok(default),
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| FieldError::new(field, format!("{n} is not a number from 1 to {max}"))),
    }
}

fn seconds(field: &'static str, v: Option<f64>, default: Duration) -> Result<Duration, FieldError> {
    match v {
        None => Ok(default),
        Some(v) => secs(v).map_err(|why| FieldError::new(field, why)),
    }
}

/// `tcp_idle_timeout`: 0 (the same as leaving it out) turns it off, so that a mapping can
/// opt out of a default. At least 2 seconds: a sockmap connection's byte counters move once
/// a second, and a shorter timeout could cut busy connections.
fn idle_timeout(v: Option<f64>) -> Result<Option<Duration>, FieldError> {
    let Some(v) = v else { return Ok(None) };
    let d = secs(v).map_err(|why| FieldError::new("tcp_idle_timeout", why))?;
    if d.is_zero() {
        return Ok(None);
    }
    if d < Duration::from_secs(2) {
        return Err(FieldError::new(
            "tcp_idle_timeout",
            format!("{v} is under 2 seconds (0 turns the timeout off)"),
        ));
    }
    Ok(Some(d))
}

/// A number of seconds from 0 to 10^9.
pub fn secs(v: f64) -> Result<Duration, String> {
    if v.is_finite() && (0.0..1e9).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("{v} is not a number of seconds"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(json: &str) -> Draft {
        serde_json::from_str(json).unwrap()
    }

    fn defaults(json: &str) -> Defaults {
        Defaults::new(serde_json::from_str(json).unwrap()).unwrap()
    }

    const TCP: &str = r#""name":"w","listen":"0.0.0.0:1","target":"10.0.0.1:1""#;
    const UDP: &str = r#""name":"w","proto":"udp","listen":"0.0.0.0:1","target":"10.0.0.1:1""#;

    #[test]
    fn defaults_fill_what_a_mapping_leaves_out_and_only_where_they_fit() {
        let d = defaults(r#"{"mode":"copy","max_connections":7,"max_flows":9}"#);
        let tcp = draft(&format!("{{{TCP}}}")).resolve(&d).unwrap();
        assert_eq!(
            (tcp.mode, tcp.max_connections, tcp.max_flows),
            (ModeChoice::Copy, 7, udp::Config::DEFAULT_MAX_FLOWS)
        );
        // A relay mode and TCP options do not apply to UDP; its own fields do.
        let udp = draft(&format!("{{{UDP}}}")).resolve(&d).unwrap();
        assert_eq!((udp.mode, udp.max_flows), (ModeChoice::Auto, 9));
        // The mapping's own field wins.
        let own = draft(&format!("{{{TCP},\"mode\":\"splice\"}}"))
            .resolve(&d)
            .unwrap();
        assert_eq!(own.mode, ModeChoice::Splice);
        let kernel = defaults(r#"{"mode":"dnat"}"#);
        let udp = draft(&format!("{{{UDP}}}")).resolve(&kernel).unwrap();
        assert_eq!(udp.mode, ModeChoice::Dnat);
    }

    #[test]
    fn udp_offload_is_on_unless_turned_off_and_only_for_udp() {
        let none = Defaults::default();
        assert!(
            draft(&format!("{{{UDP}}}"))
                .resolve(&none)
                .unwrap()
                .udp_offload
        );
        let off = draft(&format!("{{{UDP},\"udp_offload\":false}}"))
            .resolve(&none)
            .unwrap();
        assert!(!off.udp_offload);
        let e = draft(&format!("{{{TCP},\"udp_offload\":false}}"))
            .resolve(&none)
            .unwrap_err();
        assert_eq!(e.to_string(), "udp_offload: applies to udp mappings only");
        assert_eq!(e.flag(), "--no-udp-offload");
    }

    #[test]
    fn errors_name_the_field_for_every_front_end() {
        let none = Defaults::default();
        let err = |json: String| draft(&json).resolve(&none).unwrap_err();
        let e = err(format!("{{{UDP},\"mode\":\"splice\"}}"));
        assert_eq!(e.field, "mode");
        assert!(e.why.contains("\"splice\" applies to tcp"), "{e}");
        let e = err(format!("{{{UDP},\"max_connections\":5}}"));
        assert_eq!(
            e.to_string(),
            "max_connections: applies to tcp mappings only"
        );
        assert_eq!(e.flag(), "--max-connections");
        let e = err(format!("{{{UDP},\"udp_batch\":0}}"));
        assert_eq!(e.to_string(), "udp_batch: 0 is not a number from 1 to 32");
        let e = err(r#"{"name":"w","listen":"x","target":"10.0.0.1:1"}"#.into());
        assert_eq!(e.flag(), "LISTEN");
        assert!(err(r#"{"listen":"0.0.0.0:1"}"#.into()).to_string() == "name: missing");
    }

    #[test]
    fn only_kernel_mode_may_go_without_a_relay() {
        let none = Defaults::default();
        let e = draft(&format!("{{{TCP},\"relay\":false}}"))
            .resolve(&none)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "relay: false applies to mode \"dnat\" only (mode \"auto\" is a relay)"
        );
        assert_eq!(e.flag(), "--no-relay");
        let kernel = draft(&format!("{{{UDP},\"mode\":\"dnat\",\"relay\":false}}"))
            .resolve(&none)
            .unwrap();
        assert!(!kernel.relay);
        assert!(draft(&format!("{{{TCP}}}")).resolve(&none).unwrap().relay);
    }

    #[test]
    fn defaults_are_checked_on_their_own() {
        let bad = |json: &str| Defaults::new(serde_json::from_str(json).unwrap()).unwrap_err();
        assert_eq!(bad(r#"{"mode":"warp"}"#).field, "mode");
        assert_eq!(bad(r#"{"max_connections":0}"#).field, "max_connections");
        assert_eq!(bad(r#"{"udp_batch":99}"#).field, "udp_batch");
        // A relay mode as default is fine: UDP mappings simply keep auto.
        Defaults::new(serde_json::from_str(r#"{"mode":"sockmap"}"#).unwrap()).unwrap();
        assert!(serde_json::from_str::<Options>(r#"{"listen":"0.0.0.0:1"}"#).is_err());
    }

    #[test]
    fn client_cap_and_idle_timeout_are_tcp_options_off_by_default() {
        let none = Defaults::default();
        let tcp = draft(&format!("{{{TCP}}}")).resolve(&none).unwrap();
        assert_eq!(
            (tcp.max_connections_per_client, tcp.tcp_idle_timeout),
            (None, None)
        );
        let d = defaults(r#"{"max_connections_per_client":4,"tcp_idle_timeout":300}"#);
        let tcp = draft(&format!("{{{TCP}}}")).resolve(&d).unwrap();
        assert_eq!(tcp.max_connections_per_client, Some(4));
        assert_eq!(tcp.tcp_idle_timeout, Some(Duration::from_secs(300)));
        // 0 opts out of a default timeout.
        let off = draft(&format!("{{{TCP},\"tcp_idle_timeout\":0}}"))
            .resolve(&d)
            .unwrap();
        assert_eq!(off.tcp_idle_timeout, None);
        let err = |json: String| draft(&json).resolve(&none).unwrap_err().to_string();
        assert_eq!(
            err(format!("{{{TCP},\"tcp_idle_timeout\":0.5}}")),
            "tcp_idle_timeout: 0.5 is under 2 seconds (0 turns the timeout off)"
        );
        assert_eq!(
            err(format!("{{{TCP},\"max_connections_per_client\":0}}")),
            "max_connections_per_client: 0 is not a number from 1 to 10000000"
        );
        assert_eq!(
            err(format!("{{{UDP},\"tcp_idle_timeout\":5}}")),
            "tcp_idle_timeout: applies to tcp mappings only"
        );
        // UDP mappings ignore the TCP defaults.
        draft(&format!("{{{UDP}}}")).resolve(&d).unwrap();
    }

    #[test]
    fn a_draft_survives_the_wire() {
        let d = Draft::new(
            Proto::Udp,
            "[::1]:53".parse().unwrap(),
            "10.0.0.1:53".parse().unwrap(),
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"proto":"udp","listen":"[::1]:53","target":"10.0.0.1:53"}"#
        );
        assert_eq!(serde_json::from_str::<Draft>(&json).unwrap(), d);
    }
}
