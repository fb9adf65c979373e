//! Kernel mode's state under bpffs, so that its flows outlive the process: where each map and
//! link is pinned, whether a pinned set left by an earlier berth can be adopted, and removal.
//!
//! One directory per daemon holds the maps by their names (`BERTH_DNAT_CT`, ...), one link
//! per client-facing or bridge interface (`link_tc_IFINDEX`) and one per cgroup program
//! (`link_PROGRAM`). bpffs holds only bpf objects, so nothing else is kept there: the
//! layout check reads the maps themselves.
use std::{
    io,
    path::{Path, PathBuf},
};

/// `statfs(2)`'s `f_type` of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The prefix of link pins; everything else in the directory is a map.
const LINK_PREFIX: &str = "link_";
const TC_PREFIX: &str = "link_tc_";

/// Pinning cannot be used at this path.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf); kernel-mode flows end with the process"
    )]
    NotBpffs(PathBuf),
    #[error(
        "cannot use {path} for pinned kernel-mode state: bpffs refuses the name {name:?} (it holds a dot)"
    )]
    Dot { path: PathBuf, name: String },
    #[error("cannot use {path} for pinned kernel-mode state: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A map as the programs declare it, or as found pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// Why a pinned set is not adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error("map {0} is missing")]
    Missing(String),
    #[error("map {name}: {what} is {found}, this berth needs {wanted}")]
    Differs {
        name: String,
        what: &'static str,
        found: u32,
        wanted: u32,
    },
    #[error(
        "its entries are of layout {found}, this berth's are of layout {wanted} (a different berth version wrote them)"
    )]
    Layout { found: u32, wanted: u32 },
    #[error("cannot read map {name}: {why}")]
    Unreadable { name: String, why: String },
}

/// Whether the maps found can serve this berth's programs: every map present, with the same
/// type, key and value sizes, capacity and flags. A `[dnat] conntrack_entries` change makes
/// the conntrack maps differ in capacity: they are not resized in place, the set is refused.
pub fn compatible(
    wanted: &[MapLayout],
    found: impl Fn(&str) -> Option<MapLayout>,
) -> Result<(), Incompatible> {
    for w in wanted {
        let f = found(&w.name).ok_or_else(|| Incompatible::Missing(w.name.clone()))?;
        for (what, found, wanted) in [
            ("the map type", f.map_type, w.map_type),
            ("the key size", f.key_size, w.key_size),
            ("the value size", f.value_size, w.value_size),
            ("the capacity", f.max_entries, w.max_entries),
            ("the flags", f.flags, w.flags),
        ] {
            if found != wanted {
                return Err(Incompatible::Differs {
                    name: w.name.clone(),
                    what,
                    found,
                    wanted,
                });
            }
        }
    }
    Ok(())
}

/// The pin directory of one berth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// `path`, created (mode 0700) if missing, provided that it is on a bpf filesystem.
    pub fn prepare(path: &Path) -> Result<Self, PinError> {
        let io_err = |source| PinError::Io {
            path: path.to_owned(),
            source,
        };
        // The nearest existing ancestor tells which filesystem the directory will be on.
        let existing = path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing).map_err(io_err)? {
            return Err(PinError::NotBpffs(path.to_owned()));
        }
        // The kernel keeps names with a dot for its own files there (EPERM otherwise).
        if let Some(name) = path
            .strip_prefix(existing)
            .unwrap_or(path)
            .components()
            .find(|c| c.as_os_str().to_string_lossy().contains('.'))
        {
            return Err(PinError::Dot {
                path: path.to_owned(),
                name: name.as_os_str().to_string_lossy().into_owned(),
            });
        }
        if !path.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(io_err)?;
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The directory, if it exists and is on a bpf filesystem (nothing is created).
    pub fn existing(path: &Path) -> Option<Self> {
        (path.is_dir() && is_bpffs(path).unwrap_or(false)).then(|| Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn tc_link(&self, ifindex: u32) -> PathBuf {
        self.path.join(format!("{TC_PREFIX}{ifindex}"))
    }

    pub fn prog_link(&self, program: &str) -> PathBuf {
        self.path.join(format!("{LINK_PREFIX}{program}"))
    }

    /// True if an earlier berth left maps here.
    pub fn has_maps(&self) -> bool {
        self.entries().iter().any(|n| !n.starts_with(LINK_PREFIX))
    }

    /// True if anything is pinned here.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// The TC links pinned here, by interface index.
    pub fn tc_links(&self) -> Vec<(u32, PathBuf)> {
        self.entries()
            .iter()
            .filter_map(|n| {
                let index = n.strip_prefix(TC_PREFIX)?.parse().ok()?;
                Some((index, self.path.join(n)))
            })
            .collect()
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.path)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes every pin and the directory: what is still attached through a pinned link
    /// detaches once no process holds the link either.
    pub fn clear(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is written by the call before it is read.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 on x86_64, and u32 or i32 elsewhere"
    )]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The default pin directory of the daemon whose admin socket is `admin`: one per daemon, as
/// the socket is, and readable: `/run/berth/admin.sock` pins under
/// `/sys/fs/bpf/berth/run-berth-admin_sock` (bpffs refuses names with a dot).
pub fn default_dir(admin: &Path) -> PathBuf {
    let name: String = admin
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            '.' => '_',
            c => c,
        })
        .collect();
    Path::new("/sys/fs/bpf/berth").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str, max_entries: u32) -> MapLayout {
        MapLayout {
            name: name.into(),
            map_type: 9,
            key_size: 40,
            value_size: 64,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn the_same_maps_are_compatible() {
        let wanted = [layout("A", 10), layout("B", 20)];
        let found = |n: &str| wanted.iter().find(|m| m.name == n).cloned();
        assert_eq!(compatible(&wanted, found), Ok(()));
    }

    #[test]
    fn a_missing_or_different_map_is_named() {
        let wanted = [layout("A", 10), layout("B", 20)];
        assert_eq!(
            compatible(&wanted, |n| (n == "A").then(|| layout("A", 10))),
            Err(Incompatible::Missing("B".into()))
        );
        let e = compatible(&wanted, |n| {
            Some(if n == "B" {
                layout("B", 30)
            } else {
                layout(n, 10)
            })
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "map B: the capacity is 30, this berth needs 20"
        );
        let mut wider = layout("A", 10);
        wider.value_size += 8;
        let e = compatible(&wanted, |_| Some(wider.clone())).unwrap_err();
        assert!(e.to_string().contains("the value size is 72"), "{e}");
    }

    #[test]
    fn the_default_directory_is_one_per_admin_socket() {
        assert_eq!(
            default_dir(Path::new("/run/berth/admin.sock")),
            Path::new("/sys/fs/bpf/berth/run-berth-admin_sock")
        );
        assert_ne!(
            default_dir(Path::new("/tmp/a/admin.sock")),
            default_dir(Path::new("/tmp/b/admin.sock"))
        );
    }

    #[test]
    fn a_directory_off_bpffs_is_refused() {
        let dir = std::env::temp_dir().join(format!("berth-pin-{}", std::process::id()));
        let e = PinDir::prepare(&dir).unwrap_err();
        assert!(matches!(e, PinError::NotBpffs(_)), "{e}");
        assert!(!dir.exists(), "nothing is created off bpffs");
        assert!(PinDir::existing(Path::new("/tmp")).is_none());
    }
}
