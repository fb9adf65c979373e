//! The kernel programs built from `ebpf/`, embedded in the binary, and their loaders.
use aya::{
    Ebpf, EbpfError,
    maps::{MapError, SockHash},
    programs::{ProgramError, SkSkb},
};
use berth_common::sockmap;

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
    #[error("cannot start the sockmap watcher: {0}")]
    Watcher(#[source] std::io::Error),
    #[error("failed to open map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// The sockmap relay's programs and maps, loaded and attached. Dropping it detaches and
/// unloads everything: nothing is pinned, so nothing outlives the process.
#[derive(Debug)]
pub struct SockmapRelay {
    ebpf: Ebpf,
}

impl SockmapRelay {
    /// Loads the object with both maps sized to `max_entries` and attaches the stream verdict
    /// program to the SOCKHASH.
    ///
    /// # Minimum kernel version
    /// 5.7 (`bpf_get_socket_cookie` for sk_skb, SOCKHASH stream verdicts).
    pub fn load(max_entries: u32) -> Result<Self, LoaderError> {
        if OBJECT.is_empty() {
            return Err(LoaderError::NotBuilt);
        }
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(sockmap::SOCKS_MAP, max_entries)
            .map_max_entries(sockmap::PEERS_MAP, max_entries)
            .map_max_entries(sockmap::COUNTERS_MAP, max_entries)
            .load(OBJECT)?;
        let socks: SockHash<_, u64> = SockHash::try_from(
            ebpf.map(sockmap::SOCKS_MAP)
                .ok_or(LoaderError::Missing(sockmap::SOCKS_MAP))?,
        )
        .map_err(|source| LoaderError::Map {
            name: sockmap::SOCKS_MAP,
            source,
        })?;
        let socks_fd = socks.fd().try_clone().map_err(|e| LoaderError::Map {
            name: sockmap::SOCKS_MAP,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error: e,
            }),
        })?;
        let prog: &mut SkSkb = ebpf
            .program_mut(sockmap::VERDICT_PROG)
            .ok_or(LoaderError::Missing(sockmap::VERDICT_PROG))?
            .try_into()
            .map_err(|source| LoaderError::Program {
                name: sockmap::VERDICT_PROG,
                source,
            })?;
        prog.load().map_err(|source| LoaderError::Program {
            name: sockmap::VERDICT_PROG,
            source,
        })?;
        prog.attach(&socks_fd)
            .map_err(|source| LoaderError::Program {
                name: sockmap::VERDICT_PROG,
                source,
            })?;
        Ok(Self { ebpf })
    }

    /// The SOCKHASH of relayed sockets.
    pub fn socks(&mut self) -> Result<SockHash<&mut aya::maps::MapData, u64>, LoaderError> {
        let map = self
            .ebpf
            .map_mut(sockmap::SOCKS_MAP)
            .ok_or(LoaderError::Missing(sockmap::SOCKS_MAP))?;
        SockHash::try_from(map).map_err(|source| LoaderError::Map {
            name: sockmap::SOCKS_MAP,
            source,
        })
    }

    /// The peer table.
    pub fn peers(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, u64, sockmap::Peer>, LoaderError> {
        let map = self
            .ebpf
            .map_mut(sockmap::PEERS_MAP)
            .ok_or(LoaderError::Missing(sockmap::PEERS_MAP))?;
        aya::maps::HashMap::try_from(map).map_err(|source| LoaderError::Map {
            name: sockmap::PEERS_MAP,
            source,
        })
    }
}

impl SockmapRelay {
    /// The per-socket counters the program keeps.
    pub fn counters(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, u64, sockmap::Counters>, LoaderError>
    {
        let map = self
            .ebpf
            .map_mut(sockmap::COUNTERS_MAP)
            .ok_or(LoaderError::Missing(sockmap::COUNTERS_MAP))?;
        aya::maps::HashMap::try_from(map).map_err(|source| LoaderError::Map {
            name: sockmap::COUNTERS_MAP,
            source,
        })
    }
}

/// Capacities of the kernel-mode mapping tables, in entries.
#[derive(Clone, Copy, Debug)]
pub struct DnatSizes {
    pub services: u32,
    pub conntrack: u32,
    pub local_addrs: u32,
}

/// Creates the kernel-mode mapping maps (sized by `sizes`) and reads its programs, without
/// loading or attaching any program: `crate::dnat` does that, each where it belongs.
pub fn load_dnat(sizes: DnatSizes) -> Result<Ebpf, LoaderError> {
    use berth_common::dnat;
    if DNAT_OBJECT.is_empty() {
        return Err(LoaderError::NotBuilt);
    }
    Ok(aya::EbpfLoader::new()
        .map_max_entries(dnat::SERVICES_MAP, sizes.services)
        .map_max_entries(dnat::STATS_MAP, sizes.services)
        .map_max_entries(dnat::CONNTRACK_MAP, sizes.conntrack)
        .map_max_entries(dnat::REVNAT_MAP, sizes.conntrack)
        .map_max_entries(dnat::LOCAL_MAP, sizes.local_addrs)
        .load(DNAT_OBJECT)?)
}
