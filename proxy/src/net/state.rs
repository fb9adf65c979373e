//! What `berth net up` created, recorded under /run/berth/net so that `down` can remove it all.
//!
//! /run is a tmpfs, so the record lives exactly as long as the namespaces it describes.
use std::{fs, io, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{ContainerSpec, IfName, NetError};

const STATE_DIR: &str = "/run/berth/net";

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    /// The bridge was created by berth (not adopted), so `down` may delete it.
    pub(crate) bridge_created: bool,
    /// The egress rule was installed for this bridge (`--masquerade`).
    #[serde(default)]
    pub(crate) masquerade: bool,
    /// `net.ipv4.ip_forward` was 0 and berth turned it on; `down` turns it off again once no
    /// bridge of this namespace masquerades any more.
    #[serde(default)]
    pub(crate) enabled_forwarding: bool,
    #[serde(default, rename = "container")]
    pub(crate) containers: Vec<ContainerSpec>,
}

impl State {
    fn path(bridge: &IfName) -> PathBuf {
        PathBuf::from(STATE_DIR).join(format!("{bridge}.toml"))
    }

    /// The record for `bridge`, empty if there is none or it is unreadable.
    pub(crate) fn load(bridge: &IfName) -> Self {
        fs::read_to_string(Self::path(bridge))
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save(&self, bridge: &IfName) -> Result<(), NetError> {
        let path = Self::path(bridge);
        fs::create_dir_all(STATE_DIR)
            .map_err(|e| NetError::io(format!("create {STATE_DIR}"), e))?;
        let text =
            toml::to_string(self).map_err(|e| NetError::io("encode state", io::Error::other(e)))?;
        fs::write(&path, text).map_err(|e| NetError::io(format!("write {}", path.display()), e))
    }

    /// Every record, with its bridge's name.
    pub(crate) fn all() -> Vec<(String, Self)> {
        let Ok(dir) = fs::read_dir(STATE_DIR) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".toml")?.to_owned();
                let state = toml::from_str(&fs::read_to_string(e.path()).ok()?).ok()?;
                Some((name, state))
            })
            .collect()
    }

    pub(crate) fn remove(bridge: &IfName) -> Result<(), NetError> {
        match fs::remove_file(Self::path(bridge)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(NetError::io(
                format!("remove {}", Self::path(bridge).display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}
