//! `berth cni install`: puts `berth-cni` into a node's CNI plugin directory and, in each
//! network configuration list there, in place of `portmap` (what the Kubernetes DaemonSet's
//! init container runs; by hand it is the same two steps).
use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// What an install could not do.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot install the plugin at {}: {source}", path.display())]
    Plugin { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a CNI configuration list: {why}", path.display())]
    Parse { path: PathBuf, why: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What an install did to one configuration list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `portmap` was replaced (the original kept beside it as `.orig`).
    Replaced(PathBuf),
    /// `berth-cni` is there already.
    Present(PathBuf),
    /// No `portmap`, no `berth-cni`: left alone (a network without port mappings).
    Untouched(PathBuf),
}

/// The list with every `portmap` entry replaced by `berth-cni` (with the `portMappings`
/// capability, and `admin_socket` if given); `None` if it has no `portmap` (or already
/// has `berth-cni`). Other plugins and keys are kept as they are.
pub fn replace_portmap(list: &Value, admin_socket: Option<&Path>) -> Result<Option<Value>, String> {
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or("no \"plugins\" array")?;
    let is = |p: &Value, t: &str| p.get("type").and_then(Value::as_str) == Some(t);
    if plugins.iter().any(|p| is(p, "berth-cni")) || !plugins.iter().any(|p| is(p, "portmap")) {
        return Ok(None);
    }
    let mut berth = serde_json::json!({
        "type": "berth-cni",
        "capabilities": {"portMappings": true},
    });
    if let Some(a) = admin_socket {
        berth["adminSocket"] = Value::String(a.display().to_string());
    }
    let mut out = list.clone();
    out["plugins"] = plugins
        .iter()
        .map(|p| {
            if is(p, "portmap") {
                berth.clone()
            } else {
                p.clone()
            }
        })
        .collect();
    Ok(Some(out))
}

/// Copies `exe` to `bin_dir/berth-cni` (replacing it whole: a runtime may run the old one
/// meanwhile), then rewrites every `*.conflist` in `conf_dir` that has `portmap`.
pub fn install(
    exe: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    admin_socket: Option<&Path>,
) -> Result<Vec<Change>, InstallError> {
    let plugin = bin_dir.join("berth-cni");
    let err = |source| InstallError::Plugin {
        path: plugin.clone(),
        source,
    };
    std::fs::create_dir_all(bin_dir).map_err(err)?;
    let tmp = bin_dir.join(".berth-cni.new");
    std::fs::copy(exe, &tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(err)?;
    std::fs::rename(&tmp, &plugin).map_err(err)?;

    let mut lists: Vec<PathBuf> = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(InstallError::Read {
                path: conf_dir.to_owned(),
                source,
            });
        }
    };
    lists.sort();
    let mut changes = Vec::with_capacity(lists.len());
    for path in lists {
        let text = std::fs::read_to_string(&path).map_err(|source| InstallError::Read {
            path: path.clone(),
            source,
        })?;
        let parse = |why: String| InstallError::Parse {
            path: path.clone(),
            why,
        };
        let list: Value = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        let is_ours = list
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|p| p.iter().any(|p| p.get("type") == Some(&"berth-cni".into())));
        match replace_portmap(&list, admin_socket).map_err(parse)? {
            Some(new) => {
                let write = |p: &Path, t: &str| {
                    std::fs::write(p, t).map_err(|source| InstallError::Write {
                        path: p.to_owned(),
                        source,
                    })
                };
                let orig = path.with_extension("conflist.orig");
                if !orig.exists() {
                    write(&orig, &text)?;
                }
                let tmp = path.with_extension("conflist.tmp");
                let body = serde_json::to_string_pretty(&new).unwrap_or_default() + "\n";
                write(&tmp, &body)?;
                std::fs::rename(&tmp, &path).map_err(|source| InstallError::Write {
                    path: path.clone(),
                    source,
                })?;
                changes.push(Change::Replaced(path));
            }
            None if is_ours => changes.push(Change::Present(path)),
            None => changes.push(Change::Untouched(path)),
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portmap_is_replaced_in_place_and_the_rest_kept() {
        let list: Value = serde_json::from_str(
            r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true},"snat":true},{"type":"bandwidth"}]}"#,
        )
        .unwrap();
        let new = replace_portmap(&list, Some(Path::new("/run/berth/admin.sock")))
            .unwrap()
            .unwrap();
        let types: Vec<&str> = new["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "berth-cni", "bandwidth"]);
        assert_eq!(new["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(new["plugins"][1]["adminSocket"], "/run/berth/admin.sock");
        assert_eq!(new["plugins"][0], list["plugins"][0]);
        assert_eq!(new["name"], "k8s");
        // Done twice, nothing changes; no portmap, nothing changes.
        assert_eq!(replace_portmap(&new, None).unwrap(), None);
        let plain: Value = serde_json::from_str(r#"{"plugins":[{"type":"bridge"}]}"#).unwrap();
        assert_eq!(replace_portmap(&plain, None).unwrap(), None);
        assert!(replace_portmap(&serde_json::json!({"type": "bridge"}), None).is_err());
    }

    #[test]
    fn install_copies_the_plugin_and_rewrites_lists_once() {
        let dir = std::env::temp_dir().join(format!("berth-cni-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let exe = dir.join("exe");
        std::fs::write(&exe, b"#!/bin/true\n").unwrap();
        let with = r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        std::fs::write(conf.join("10-a.conflist"), with).unwrap();
        std::fs::write(
            conf.join("20-b.conflist"),
            r#"{"name":"b","plugins":[{"type":"ptp"}]}"#,
        )
        .unwrap();
        std::fs::write(conf.join("README"), "not a list").unwrap();
        let changes = install(&exe, &bin, &conf, None).unwrap();
        assert_eq!(
            changes,
            [
                Change::Replaced(conf.join("10-a.conflist")),
                Change::Untouched(conf.join("20-b.conflist")),
            ]
        );
        assert_eq!(
            std::fs::read(bin.join("berth-cni")).unwrap(),
            b"#!/bin/true\n"
        );
        assert_eq!(
            std::fs::read_to_string(conf.join("10-a.conflist.orig")).unwrap(),
            with
        );
        let again = install(&exe, &bin, &conf, None).unwrap();
        assert_eq!(again[0], Change::Present(conf.join("10-a.conflist")));
        std::fs::write(conf.join("30-bad.conflist"), "{").unwrap();
        assert!(matches!(
            install(&exe, &bin, &conf, None),
            Err(InstallError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
