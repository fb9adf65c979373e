//! Persistent runtime mappings: those added with `"persist": true` (the CNI plugin's, whose
//! process exits at once) are written to a state file, so that a restarted daemon serves
//! them again. The file lives under /run by default: a reboot forgets it, as it forgets the
//! containers.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::mapping::Draft;

/// The file's format version.
const VERSION: u32 = 1;

/// One persistent mapping: who added it, and what it asked for (with its name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Saved {
    pub(super) owner: String,
    pub(super) mapping: Draft,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    mappings: Vec<Saved>,
}

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PersistError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a berth state file (moved aside to {}): {why}", path.display(), aside.display())]
    Corrupt {
        path: PathBuf,
        aside: PathBuf,
        why: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// The persistent mappings by name, and where they are kept.
#[derive(Debug)]
pub(super) struct Store {
    path: PathBuf,
    mappings: BTreeMap<String, Saved>,
}

impl Store {
    /// An empty store kept at `path`.
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            mappings: BTreeMap::new(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// What the file holds; nothing if it does not exist. A file that does not parse is
    /// moved aside (never deleted) and reported.
    pub(super) fn load(path: &Path) -> Result<Vec<Saved>, PersistError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PersistError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        match parse(&text) {
            Ok(m) => Ok(m),
            Err(why) => {
                let aside = path.with_extension("corrupt");
                let _ = std::fs::rename(path, &aside);
                Err(PersistError::Corrupt {
                    path: path.to_owned(),
                    aside,
                    why,
                })
            }
        }
    }

    /// A store holding `saved` (what [`Store::load`] read) without writing anything.
    pub(super) fn with(path: PathBuf, saved: Vec<Saved>) -> Self {
        let mappings = saved
            .into_iter()
            .map(|s| (s.mapping.name.clone().unwrap_or_default(), s))
            .collect();
        Self { path, mappings }
    }

    /// Records `saved` under `name` and writes the file (unless it holds that already); on a
    /// write error the store is as before.
    pub(super) fn insert(&mut self, name: String, saved: Saved) -> Result<(), PersistError> {
        if self.mappings.get(&name) == Some(&saved) {
            return Ok(());
        }
        let old = self.mappings.insert(name.clone(), saved);
        self.save().inspect_err(|_| {
            match old {
                Some(o) => self.mappings.insert(name, o),
                None => self.mappings.remove(&name),
            };
        })
    }

    /// Forgets `names` and writes the file if anything changed.
    pub(super) fn remove<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), PersistError> {
        let mut changed = false;
        for n in names {
            changed |= self.mappings.remove(n).is_some();
        }
        if changed { self.save() } else { Ok(()) }
    }

    /// Writes the file whole: a temporary file renamed over it, so that a crash leaves the
    /// old or the new state, never half of one.
    pub(super) fn save(&self) -> Result<(), PersistError> {
        let err = |source| PersistError::Write {
            path: self.path.clone(),
            source,
        };
        let file = File {
            version: VERSION,
            mappings: self.mappings.values().cloned().collect(),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(io::Error::other)
            .map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text + "\n").map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// Removes `owner`'s mappings from the state file at `path` while no daemon runs (CNI's DEL
/// when the daemon is down: they must not come back when it starts). Returns how many there
/// were; a missing file holds none.
pub(crate) fn forget_owner(path: &Path, owner: &str) -> Result<usize, PersistError> {
    let saved = Store::load(path)?;
    let before = saved.len();
    let store = Store::with(
        path.to_owned(),
        saved.into_iter().filter(|s| s.owner != owner).collect(),
    );
    let gone = before - store.mappings.len();
    if gone > 0 {
        store.save()?;
    }
    Ok(gone)
}

fn parse(text: &str) -> Result<Vec<Saved>, String> {
    let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if file.version != VERSION {
        return Err(format!(
            "version {} (this berth reads version {VERSION})",
            file.version
        ));
    }
    if let Some(s) = file.mappings.iter().find(|s| s.mapping.name.is_none()) {
        return Err(format!("a mapping of {} has no name", s.owner));
    }
    Ok(file.mappings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Proto;

    /// A scratch directory, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("berth-persist-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn saved(name: &str) -> Saved {
        let mut d = Draft::new(
            Proto::Tcp,
            "0.0.0.0:8080".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        d.name = Some(name.into());
        Saved {
            owner: "cni:abc:eth0".into(),
            mapping: d,
        }
    }

    #[test]
    fn round_trip_and_removal() {
        let dir = Scratch::new("rt");
        let path = dir.path().join("sub/admin.state.json");
        assert_eq!(Store::load(&path).unwrap(), Vec::new());
        let mut store = Store::new(path.clone());
        store.insert("a".into(), saved("a")).unwrap();
        store.insert("b".into(), saved("b")).unwrap();
        assert_eq!(Store::load(&path).unwrap(), vec![saved("a"), saved("b")]);
        store.remove(["a", "nothing"]).unwrap();
        assert_eq!(Store::load(&path).unwrap(), vec![saved("b")]);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_store_made_from_the_file_rewrites_nothing_unchanged() {
        let dir = Scratch::new("with");
        let path = dir.path().join("admin.state.json");
        let mut store = Store::with(path.clone(), vec![saved("a")]);
        store.insert("a".into(), saved("a")).unwrap();
        assert!(!path.exists(), "an unchanged entry was written");
        store.insert("b".into(), saved("b")).unwrap();
        assert_eq!(Store::load(&path).unwrap(), vec![saved("a"), saved("b")]);
    }

    #[test]
    fn an_owner_is_forgotten_offline() {
        let dir = Scratch::new("forget");
        let path = dir.path().join("admin.state.json");
        assert_eq!(forget_owner(&path, "cni:abc:eth0").unwrap(), 0);
        let mut store = Store::new(path.clone());
        store.insert("a".into(), saved("a")).unwrap();
        let other = Saved {
            owner: "cni:other:eth0".into(),
            ..saved("b")
        };
        store.insert("b".into(), other.clone()).unwrap();
        assert_eq!(forget_owner(&path, "cni:abc:eth0").unwrap(), 1);
        assert_eq!(Store::load(&path).unwrap(), vec![other]);
    }

    #[test]
    fn a_bad_file_is_moved_aside_not_lost() {
        let dir = Scratch::new("bad");
        let path = dir.path().join("admin.state.json");
        for text in ["{not json", r#"{"version":9,"mappings":[]}"#] {
            std::fs::write(&path, text).unwrap();
            let e = Store::load(&path).unwrap_err();
            assert!(matches!(e, PersistError::Corrupt { .. }), "{e}");
            assert!(!path.exists());
            assert_eq!(
                std::fs::read_to_string(path.with_extension("corrupt")).unwrap(),
                text
            );
        }
    }

    #[test]
    fn a_failed_write_leaves_the_store_as_it_was() {
        // A directory where the file should be: rename fails.
        let dir = Scratch::new("fail");
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "").unwrap();
        let mut store = Store::new(path);
        assert!(store.insert("a".into(), saved("a")).is_err());
        assert!(store.mappings.is_empty());
    }
}
