//! docker-proxy's command line, parsed with Go `flag` package rules: `-name value`,
//! `-name=value`, `--name` the same, booleans as `-name` or `-name=true|false`, and parsing
//! stops at `--` or at the first argument that is not a flag.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{
    addr::{ListenAddr, Proto, TargetAddr},
    mapping::{Draft, ModeChoice},
};

pub const USAGE: &str = "\
Usage of berth-docker-proxy (a drop-in for docker-proxy):
  -proto string            proxy protocol: tcp or udp (sctp is not supported) (default \"tcp\")
  -host-ip value           host ip (default 0.0.0.0)
  -host-port int           host port (default -1)
  -container-ip value      container ip (default 0.0.0.0)
  -container-port int      container port (default -1)
  -use-listen-fd           use the listening socket passed as fd 4
  -mode string             berth extension: auto, copy or splice; with a berth daemon also
                           sockmap or dnat (default: the daemon's [defaults], else auto)
  -v, -version             print version information and quit
Status is reported on fd 3: \"0\\n\" once listening, \"1\\n<error>\" on failure.
With a berth daemon on $BERTH_ADMIN_SOCKET (default /run/berth/admin.sock) the port is
handed to it and served there; without one, or while it is away, this process serves it.";

/// A valid docker-proxy invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub proto: Proto,
    /// `None` with `-use-listen-fd`: the socket comes from fd 4.
    pub listen: Option<ListenAddr>,
    pub target: TargetAddr,
    pub use_listen_fd: bool,
    /// `None`: the daemon's `[defaults]` decide (auto when standalone).
    pub mode: Option<ModeChoice>,
}

impl Args {
    /// The mapping, as every front end describes one. `listen` is where the socket is bound
    /// (from `-host-ip`/`-host-port`, or fd 4's address).
    pub fn draft(&self, listen: ListenAddr) -> Draft {
        let mut d = Draft::new(self.proto, listen, self.target);
        d.mode = self.mode.map(|m| m.to_string());
        d
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Version,
    Help,
}

/// The command line is unusable; the message is what docker-proxy would report.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("flag provided but not defined: -{0}")]
    Unknown(String),
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid value {value:?} for flag -{flag}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("-{0} is required")]
    Required(&'static str),
    #[error("unsupported protocol {0} (berth-docker-proxy serves tcp and udp)")]
    Unsupported(&'static str),
}

impl Args {
    /// Parses `argv` without the program name.
    pub fn parse<I, S>(argv: I) -> Result<Parsed, ArgsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut proto = Proto::Tcp;
        let mut host_ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let mut container_ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let (mut host_port, mut container_port): (Option<u16>, Option<u16>) = (None, None);
        let mut use_listen_fd = false;
        let mut version = false;
        let mut mode = None;

        let mut args = argv.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            if arg == "--" || !arg.starts_with('-') || arg == "-" {
                break;
            }
            let body = arg.trim_start_matches('-');
            if arg.starts_with("---") || body.is_empty() {
                return Err(ArgsError::Unknown(body.to_owned()));
            }
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let mut value = |flag: &'static str| -> Result<String, ArgsError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args
                        .next()
                        .ok_or_else(|| ArgsError::MissingValue(flag.to_owned())),
                }
            };
            let boolean = |flag: &'static str| -> Result<bool, ArgsError> {
                match inline.as_deref() {
                    None | Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
                    Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
                    Some(v) => Err(ArgsError::Invalid {
                        flag,
                        value: v.to_owned(),
                        why: "expected true or false",
                    }),
                }
            };
            match name {
                "proto" => {
                    proto = match value("proto")?.as_str() {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        "sctp" => return Err(ArgsError::Unsupported("sctp")),
                        v => {
                            return Err(ArgsError::Invalid {
                                flag: "proto",
                                value: v.to_owned(),
                                why: "expected tcp, udp or sctp",
                            });
                        }
                    }
                }
                "host-ip" => host_ip = ip(value("host-ip")?, "host-ip")?,
                "container-ip" => container_ip = ip(value("container-ip")?, "container-ip")?,
                "host-port" => host_port = Some(port(value("host-port")?, "host-port")?),
                "container-port" => {
                    container_port = Some(port(value("container-port")?, "container-port")?);
                }
                "use-listen-fd" => use_listen_fd = boolean("use-listen-fd")?,
                "v" => version = boolean("v")?,
                "version" => version = boolean("version")?,
                "mode" => {
                    let v = value("mode")?;
                    mode = Some(v.parse().map_err(|_| ArgsError::Invalid {
                        flag: "mode",
                        value: v,
                        why: "expected auto, copy, splice, sockmap or dnat",
                    })?);
                }
                "h" | "help" => return Ok(Parsed::Help),
                other => return Err(ArgsError::Unknown(other.to_owned())),
            }
        }
        if version {
            return Ok(Parsed::Version);
        }
        let container_port = container_port.ok_or(ArgsError::Required("container-port"))?;
        if container_port == 0 {
            return Err(ArgsError::Invalid {
                flag: "container-port",
                value: "0".into(),
                why: "port 0 cannot be connected to",
            });
        }
        let listen = match (use_listen_fd, host_port) {
            (true, _) => None,
            (false, Some(p)) => Some(ListenAddr(SocketAddr::new(host_ip, p))),
            (false, None) => return Err(ArgsError::Required("host-port")),
        };
        Ok(Parsed::Run(Self {
            proto,
            listen,
            target: TargetAddr(SocketAddr::new(container_ip, container_port)),
            use_listen_fd,
            mode,
        }))
    }
}

fn ip(v: String, flag: &'static str) -> Result<IpAddr, ArgsError> {
    v.parse().map_err(|_| ArgsError::Invalid {
        flag,
        value: v,
        why: "not an IP address",
    })
}

fn port(v: String, flag: &'static str) -> Result<u16, ArgsError> {
    v.parse().map_err(|_| ArgsError::Invalid {
        flag,
        value: v,
        why: "expected a port from 0 to 65535",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> Args {
        match Args::parse(argv.iter().copied()).unwrap() {
            Parsed::Run(a) => a,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn parses_dockerd_command_line() {
        let a = run(&[
            "-proto",
            "tcp",
            "-host-ip",
            "0.0.0.0",
            "-host-port",
            "9091",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "80",
            "-use-listen-fd",
        ]);
        assert!(a.use_listen_fd);
        assert_eq!(a.proto, Proto::Tcp);
        assert_eq!(a.listen, None);
        assert_eq!(a.target.to_string(), "172.17.0.2:80");
        let b = run(&[
            "--host-ip=::1",
            "-host-port=8080",
            "-container-ip=fd00::2",
            "-container-port=80",
            "-mode=copy",
        ]);
        assert_eq!(b.listen.unwrap().to_string(), "[::1]:8080");
        assert_eq!(b.mode, Some(ModeChoice::Copy));
        let u = run(&[
            "-proto",
            "udp",
            "-host-port",
            "53",
            "-container-port",
            "5353",
        ]);
        assert_eq!(
            (u.proto, u.listen.unwrap().to_string()),
            (Proto::Udp, "0.0.0.0:53".into())
        );
        assert!(
            !run(&[
                "-host-port",
                "1",
                "-container-port",
                "2",
                "-use-listen-fd=false"
            ])
            .use_listen_fd
        );
    }

    #[test]
    fn version_and_help() {
        assert_eq!(Args::parse(["-v"]), Ok(Parsed::Version));
        assert_eq!(Args::parse(["--version"]), Ok(Parsed::Version));
        assert_eq!(Args::parse(["-h"]), Ok(Parsed::Help));
    }

    #[test]
    fn rejects_bad_arguments_with_docker_proxy_messages() {
        let err = |argv: &[&str]| Args::parse(argv.iter().copied()).unwrap_err().to_string();
        assert_eq!(err(&["-bogus"]), "flag provided but not defined: -bogus");
        assert_eq!(err(&["-host-port"]), "flag needs an argument: -host-port");
        assert!(
            err(&["-host-port", "99999", "-container-port", "1"])
                .contains("invalid value \"99999\"")
        );
        assert!(
            err(&[
                "-host-ip",
                "nope",
                "-host-port",
                "1",
                "-container-port",
                "1"
            ])
            .contains("not an IP")
        );
        assert!(err(&["-host-port", "1"]).contains("-container-port is required"));
        assert!(err(&["-container-port", "1"]).contains("-host-port is required"));
        assert!(err(&["-proto", "sctp"]).contains("unsupported protocol sctp"));
        assert!(err(&["-use-listen-fd=maybe"]).contains("expected true or false"));
        assert!(err(&["-mode", "warp"]).contains("expected auto, copy, splice"));
    }
}
