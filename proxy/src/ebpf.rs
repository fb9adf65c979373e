//! The kernel programs built from `ebpf/`, embedded in the binary, and their loaders.
use std::sync::{Mutex, RwLock};

use aya::{
    Ebpf, EbpfError,
    maps::{HashMap, Map, MapData, MapError, RingBuf, SockHash},
    programs::{Program, ProgramError, SkSkb},
};
use berth_common::sockmap;

use crate::dnat::pin::{MapLayout, PinDir};

/// The object file built by `build.rs`; empty when built with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-ebpf"));

/// The kernel-mode port mapping object (`ebpf/src/dnat.rs`); empty like [`OBJECT`].
static DNAT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-dnat"));

/// Loading or attaching a kernel program failed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("this berth was built without its eBPF programs (AYA_BUILD_SKIP was set)")]
    NotBuilt,
    #[error("failed to load the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("failed to load or attach {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot start the sockmap relay's socket watcher or credit reader: {0}")]
    Watcher(#[source] std::io::Error),
    #[error("failed to open map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

impl LoaderError {
    /// The message with every cause below it, the kernel's errno included: aya's errors keep
    /// the system call's error as a source their own text leaves out ("failed to create
    /// map"), and that errno is what tells an operator which permission is missing.
    pub fn detail(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            let part = e.to_string();
            if !text.contains(&part) {
                text = format!("{text}: {part}");
            }
            cause = e.source();
        }
        text
    }
}

/// The sockmap relay's programs and maps, loaded and attached. Dropping it detaches and
/// unloads everything: nothing is pinned, so nothing outlives the process.
///
/// Each map has its own lock, held only for one `bpf()` call: aya needs `&mut` to change a
/// map, the kernel does not, and one lock over all three made concurrent connection set-ups
/// queue behind each other's system calls.
pub struct SockmapRelay {
    /// The verdict program and its attachment; first, so that it detaches before the maps
    /// close.
    _programs: Ebpf,
    /// The SOCKHASH of relayed sockets.
    pub socks: Mutex<SockHash<MapData, u64>>,
    /// The peer table.
    pub peers: Mutex<HashMap<MapData, u64, sockmap::Peer>>,
    /// The per-socket counters the program keeps (read far more often than changed).
    pub counters: RwLock<HashMap<MapData, u64, sockmap::Counters>>,
    /// Sockets whose redirect allowance runs low; taken by the one reader.
    credits: Option<RingBuf<MapData>>,
}

impl SockmapRelay {
    /// Loads the object with its maps sized to `max_entries` and attaches the stream verdict
    /// program to the SOCKHASH.
    ///
    /// # Minimum kernel version
    /// 5.10: `bpf_skb_adjust_room` for sk_skb, with which the program trims retransmitted
    /// overlaps (`bpf_get_socket_cookie` for sk_skb and SOCKHASH stream verdicts date from 5.7).
    pub fn load(max_entries: u32) -> Result<Self, LoaderError> {
        if OBJECT.is_empty() {
            return Err(LoaderError::NotBuilt);
        }
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(sockmap::SOCKS_MAP, max_entries)
            .map_max_entries(sockmap::PEERS_MAP, max_entries)
            .map_max_entries(sockmap::COUNTERS_MAP, max_entries)
            .load(OBJECT)?;
        let socks: SockHash<_, u64> = typed(&mut ebpf, sockmap::SOCKS_MAP)?;
        let peers = typed(&mut ebpf, sockmap::PEERS_MAP)?;
        let counters = typed(&mut ebpf, sockmap::COUNTERS_MAP)?;
        let credits = typed(&mut ebpf, sockmap::CREDITS_MAP)?;
        let prog: &mut SkSkb = program(&mut ebpf, sockmap::VERDICT_PROG)?;
        prog.load().map_err(|source| LoaderError::Program {
            name: sockmap::VERDICT_PROG,
            source,
        })?;
        prog.attach(socks.fd())
            .map_err(|source| LoaderError::Program {
                name: sockmap::VERDICT_PROG,
                source,
            })?;
        Ok(Self {
            _programs: ebpf,
            socks: Mutex::new(socks),
            peers: Mutex::new(peers),
            counters: RwLock::new(counters),
            credits: Some(credits),
        })
    }

    /// The ring on which the program reports sockets whose allowance runs low (see
    /// `berth_common::sockmap`); `None` once taken.
    pub fn take_credits(&mut self) -> Option<RingBuf<MapData>> {
        self.credits.take()
    }
}

// aya's typed maps are not Debug; the program object says what is loaded.
impl std::fmt::Debug for SockmapRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockmapRelay")
            .field("programs", &self._programs)
            .finish_non_exhaustive()
    }
}

/// Program `name` of `ebpf`, as its type (`SkSkb`, `SchedClassifier`, ...).
pub(crate) fn program<'a, P: 'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, LoaderError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(LoaderError::Missing(name))?;
    program
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

/// Takes map `name` out of `ebpf` as its typed form.
fn typed<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoaderError> {
    let map = ebpf.take_map(name).ok_or(LoaderError::Missing(name))?;
    T::try_from(map).map_err(|source| LoaderError::Map { name, source })
}

/// Capacities of the kernel-mode mapping tables, in entries.
#[derive(Clone, Copy, Debug)]
pub struct DnatSizes {
    pub services: u32,
    pub conntrack: u32,
    pub local_addrs: u32,
}

impl DnatSizes {
    /// The capacity of map `name`, where these sizes set it.
    fn of(&self, name: &str) -> Option<u32> {
        use berth_common::dnat;
        match name {
            dnat::SERVICES_MAP | dnat::STATS_MAP => Some(self.services),
            dnat::CONNTRACK_MAP | dnat::REVNAT_MAP => Some(self.conntrack),
            dnat::LOCAL_MAP => Some(self.local_addrs),
            _ => None,
        }
    }
}

/// Creates the kernel-mode mapping maps (sized by `sizes`) and reads its programs, without
/// loading or attaching any program: `crate::dnat` does that, each where it belongs. With
/// `pins`, every map is pinned there, and a map already pinned there is used as it is (check
/// it with [`dnat_layout`] first: aya does not).
pub fn load_dnat(sizes: DnatSizes, pins: Option<&PinDir>) -> Result<Ebpf, LoaderError> {
    use berth_common::dnat;
    if DNAT_OBJECT.is_empty() {
        return Err(LoaderError::NotBuilt);
    }
    let mut loader = aya::EbpfLoader::new();
    for name in dnat::MAPS {
        if let Some(n) = sizes.of(name) {
            loader.map_max_entries(name, n);
        }
        if let Some(p) = pins {
            loader.map_pin_path(name, p.map(name));
        }
    }
    Ok(loader.load(DNAT_OBJECT)?)
}

/// The kernel-mode maps as [`load_dnat`] creates them with `sizes`, read from the object.
pub fn dnat_layout(sizes: DnatSizes) -> Result<Vec<MapLayout>, LoaderError> {
    use berth_common::dnat;
    if DNAT_OBJECT.is_empty() {
        return Err(LoaderError::NotBuilt);
    }
    let obj = aya_obj::Object::parse(DNAT_OBJECT)
        .map_err(|e| LoaderError::Load(aya::EbpfError::ParseError(e)))?;
    dnat::MAPS
        .iter()
        .map(|&name| {
            let m = obj.maps.get(name).ok_or(LoaderError::Missing(name))?;
            Ok(MapLayout {
                name: name.to_owned(),
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.of(name).unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            })
        })
        .collect()
}

/// Map `name` pinned in `pins`, as found there.
pub fn pinned_layout(pins: &PinDir, name: &str) -> Option<MapLayout> {
    let info = aya::maps::MapInfo::from_pin(pins.map(name)).ok()?;
    Some(MapLayout {
        name: name.to_owned(),
        map_type: info.map_type().ok()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn detail_shows_the_errno_below_aya_s_message() {
        let e =
            super::LoaderError::Load(aya::EbpfError::MapError(aya::maps::MapError::CreateError {
                name: "BERTH_PEERS".into(),
                io_error: std::io::Error::from_raw_os_error(libc::EPERM),
            }));
        let d = e.detail();
        assert!(
            d.contains("BERTH_PEERS") && d.contains("Operation not permitted"),
            "{d}"
        );
        assert_eq!(d.matches("failed to create map").count(), 1, "{d}");
    }
}
