//! `berth-cni`: a chained CNI plugin that publishes `runtimeConfig.portMappings` through the
//! berth daemon, in place of the reference `portmap` plugin (Podman, containerd's CRI,
//! Kubernetes hostPorts).
//!
//! The plugin process lives for one command, so its mappings are *persistent* runtime
//! mappings owned by `cni:<container id>:<ifname>`: the daemon keeps them in its state file
//! and restores them when it restarts. DEL removes the owner's mappings with their
//! connections, flows and conntrack entries, so a restarted container never inherits a stale
//! UDP flow.
//!
//! - [`conf`]: the command, the environment and the network configuration, free of I/O.
//! - [`install`]: `berth cni install`, into a node's plugin and configuration directories.
use std::{
    io::{IsTerminal as _, Read as _, Write as _},
    path::Path,
    process::ExitCode,
};

pub mod conf;
pub mod install;

use conf::{Attachment, CniError, Command, NetConf, OWNER_PREFIX, code};
use serde_json::Value;

use crate::service::{
    admin::{AdminError, Client},
    api::{Call, Reply},
    status::Row,
};

/// The plugin's entry point: reads the environment and stdin, prints a result or the spec's
/// error object on stdout, and exits non-zero on error.
pub fn main() -> ExitCode {
    let get = |k: &str| std::env::var(k).ok();
    let mut input = Vec::new();
    let outcome = match get("CNI_COMMAND") {
        None => Err(CniError::new(
            code::BAD_ENV,
            "CNI_COMMAND is not set",
            "berth-cni is a CNI plugin: a container runtime runs it (see docs/cni.md)",
        )),
        Some(c) => c.parse::<Command>().and_then(|cmd| {
            // VERSION may be run by hand, from a terminal with nothing to read.
            if cmd != Command::Version || !std::io::stdin().is_terminal() {
                std::io::stdin().read_to_end(&mut input).map_err(|e| {
                    CniError::new(
                        code::DECODE,
                        "cannot read the network configuration",
                        e.to_string(),
                    )
                })?;
            }
            run(cmd, &input, get)
        }),
    };
    let version = conf::asked_version(&input);
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("cniVersion".into(), Value::String(version));
            }
            let _ = writeln!(out, "{v}");
            eprintln!("berth-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; `Some` is the JSON to print.
fn run(
    cmd: Command,
    input: &[u8],
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<Value>, CniError> {
    if cmd == Command::Version {
        return Ok(Some(serde_json::json!({
            "cniVersion": conf::asked_version(input),
            "supportedVersions": conf::SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(input)?;
    let admin = conf
        .admin_socket
        .clone()
        .unwrap_or_else(crate::service::admin_socket);
    match cmd {
        Command::Add => {
            let at = Attachment::from_env(&get)?;
            add(&conf, &at, &admin)?;
            Ok(Some(conf::add_result(&conf)))
        }
        Command::Del => {
            let at = Attachment::from_env(&get)?;
            match Client::connect(&admin) {
                Ok(mut c) => remove_owner(&mut c, &at.owner())?,
                // The daemon is down: its state file must not bring the mappings back.
                Err(e) => {
                    let state = conf
                        .state_file
                        .clone()
                        .unwrap_or_else(|| crate::service::config::default_state_file(&admin));
                    crate::service::forget_owner(&state, &at.owner()).map_err(|p| {
                        CniError::new(
                            code::TRY_AGAIN_LATER,
                            "the berth daemon cannot be reached, and its state file cannot be updated",
                            format!("{e}; {p}"),
                        )
                    })?;
                }
            }
            Ok(None)
        }
        Command::Check => {
            let at = Attachment::from_env(&get)?;
            check(&conf, &at, &admin)?;
            Ok(None)
        }
        Command::Gc => {
            gc(&conf, &admin)?;
            Ok(None)
        }
        Command::Status => {
            let mut c = connect(&admin, code::NOT_AVAILABLE)?;
            call(&mut c, &Call::Status, code::NOT_AVAILABLE)?;
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

fn connect(admin: &Path, code: u32) -> Result<Client, CniError> {
    Client::connect(admin).map_err(|e| unavailable(&e, code))
}

fn unavailable(e: &AdminError, code: u32) -> CniError {
    CniError::new(
        code,
        "the berth daemon cannot be reached",
        format!("{e} (is `berth run` running? the plugin config's adminSocket names its socket)"),
    )
}

/// One call; a refusal is an error with `refused` as its code.
fn call(c: &mut Client, call: &Call, refused: u32) -> Result<Reply, CniError> {
    let r = c
        .call(call, None)
        .map_err(|e| unavailable(&e, code::TRY_AGAIN_LATER))?;
    if r.ok {
        Ok(r)
    } else {
        Err(CniError::new(
            refused,
            "the berth daemon refused",
            r.message,
        ))
    }
}

fn remove_owner(c: &mut Client, owner: &str) -> Result<(), CniError> {
    let remove = Call::Remove {
        name: None,
        owner: Some(owner.into()),
    };
    call(c, &remove, code::REFUSED).map(drop)
}

/// ADD: replaces whatever the attachment had (a repeated ADD), all or nothing.
fn add(conf: &NetConf, at: &Attachment, admin: &Path) -> Result<(), CniError> {
    let drafts = conf.drafts(&at.ifname)?;
    let mut c = connect(admin, code::TRY_AGAIN_LATER)?;
    let owner = at.owner();
    remove_owner(&mut c, &owner)?;
    for d in drafts {
        let add = Call::Add {
            mapping: Box::new(d),
            owner: Some(owner.clone()),
            lease: false,
            persist: true,
        };
        if let Err(e) = call(&mut c, &add, code::REFUSED) {
            let _ = remove_owner(&mut c, &owner);
            return Err(e);
        }
    }
    Ok(())
}

/// CHECK: every mapping the attachment asks for is there and served as asked.
fn check(conf: &NetConf, at: &Attachment, admin: &Path) -> Result<(), CniError> {
    let want = conf.drafts(&at.ifname)?;
    let mut c = connect(admin, code::TRY_AGAIN_LATER)?;
    let rows = call(&mut c, &Call::List, code::REFUSED)?.mappings;
    let owner = at.owner();
    let ours: Vec<&Row> = rows.iter().filter(|r| r.owner == owner).collect();
    for d in &want {
        let (proto, listen, target) = (
            d.proto.as_deref().unwrap_or("tcp"),
            d.listen.as_deref().unwrap_or(""),
            d.target.as_deref().unwrap_or(""),
        );
        let found = ours
            .iter()
            .find(|r| r.proto == proto && r.listen == listen && r.target == target);
        match found {
            None => {
                return Err(CniError::new(
                    code::CHECK_FAILED,
                    "a port mapping is missing",
                    format!("{proto} {listen} -> {target} of {owner}"),
                ));
            }
            Some(r) if r.state != "active" => {
                return Err(CniError::new(
                    code::CHECK_FAILED,
                    "a port mapping is not served as asked",
                    format!("{}: {}", r.name, r.state),
                ));
            }
            Some(_) => {}
        }
    }
    if ours.len() != want.len() {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "the attachment has mappings it did not ask for",
            format!("{} served, {} asked for", ours.len(), want.len()),
        ));
    }
    Ok(())
}

/// GC: removes every CNI attachment's mappings that the runtime no longer knows.
fn gc(conf: &NetConf, admin: &Path) -> Result<(), CniError> {
    let valid: std::collections::BTreeSet<String> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|v| {
            Attachment {
                container_id: v.container_id.clone(),
                ifname: v.ifname.clone(),
            }
            .owner()
        })
        .collect();
    let mut c = connect(admin, code::TRY_AGAIN_LATER)?;
    let rows = call(&mut c, &Call::List, code::REFUSED)?.mappings;
    let stale: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| r.owner.as_str())
        .filter(|o| o.starts_with(OWNER_PREFIX) && !valid.contains(*o))
        .collect();
    for owner in stale {
        remove_owner(&mut c, owner)?;
    }
    Ok(())
}
