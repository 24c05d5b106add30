//! The clients' memory tables: checked against their backing files when
//! they arrive, and guarded while they are used.
//!
//! A vhost-user client hands the reflector file descriptors of its guest RAM
//! and says how much of each to map. Two things can make a touch of that
//! mapping raise SIGBUS, which would kill the reflector and with it every
//! device, client and driver VM:
//! - a region larger than its file (a hostile table: 64 TiB on a 1 MiB
//!   memfd maps fine, then faults on first touch), refused here by
//!   [`check_table`] before any queue can point into it;
//! - a file that shrinks after the table was accepted (a hostile client
//!   truncating its memfd) or runs out of pages (QEMU's RAM on a full tmpfs
//!   or hugetlbfs): nothing checked in advance can prevent that, so every
//!   client mapping is registered with a process-wide SIGBUS handler
//!   ([`guard`]). A fault inside a registered range is absorbed: the page is
//!   replaced by a private zero page (the faulting access then completes on
//!   it) and the range is marked poisoned. The device owning it sees
//!   [`Registration::poisoned`] and stops serving that client; only the
//!   client that broke its own memory is affected. A SIGBUS anywhere else is
//!   a real bug and kills the process as before.
//!
//! This module is not the reader of client memory (`blk::marshal`,
//! `net::marshal` and the virtqueue code are): it only makes their reads
//! and writes survivable.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// What is wrong with a client's memory table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A region maps past the end of its file.
    #[error(
        "memory region {index} (guest address {guest:#x}) maps {size} bytes at file offset {offset}, \
         but its file holds only {file_size} bytes: the client's memory table is wrong"
    )]
    BeyondFile {
        /// The region's index in the table.
        index: usize,
        /// Its guest physical address.
        guest: u64,
        /// Its size.
        size: u64,
        /// Its offset in the file.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A region's file cannot be inspected.
    #[error("memory region {index}: cannot inspect its file: {source}")]
    Stat {
        /// The region's index in the table.
        index: usize,
        /// Why.
        source: std::io::Error,
    },
    /// A region is not backed by a file that can be shared.
    #[error("memory region {index} is not backed by a regular file or memfd (mode {mode:#o})")]
    NotAFile {
        /// The region's index in the table.
        index: usize,
        /// The file's mode.
        mode: u32,
    },
    /// Every registration slot of the SIGBUS guard is taken.
    #[error("too many client memory regions are mapped at once ({REGISTRY_SLOTS}): cannot guard another")]
    GuardFull,
    /// The device's client has as many tables mapped as it may: its older
    /// ones are still held by requests in flight.
    #[error("the client's earlier memory tables are still held by requests in flight ({TABLES_PER_DEVICE} at most)")]
    TooManyTables,
    /// A table of more regions than the device offered memory slots.
    #[error("the client's memory table has {regions} regions, more than the {REGIONS_PER_TABLE} a client may send")]
    TooManyRegions {
        /// Regions in the table.
        regions: usize,
    },
}

/// Most regions in one client's table: vhost-user's baseline, which QEMU
/// keeps to unless the backend offers `CONFIGURE_MEM_SLOTS` (none here
/// does, and the vhost-user handler refuses protocol features it did not
/// offer). Without it, a client adding regions one message at a time took
/// every slot of the guard ([`REGISTRY_SLOTS`]) and every other device's
/// client was refused.
pub const REGIONS_PER_TABLE: usize = 8;

/// Most of one device's client's tables mapped at once: the one in use and
/// older ones that requests in flight still hold (a `dma=direct` window
/// keeps its table mapped and guarded until its request ends). Without a
/// bound, a client replacing its table before each request, beside a
/// driver that withholds its answers, pinned up to 128 tables of 8
/// regions each: eight such devices took every slot of the guard
/// ([`REGISTRY_SLOTS`]), and every other device's client was refused.
/// A client replaces its table when its guest's memory changes (hotplug),
/// not a fourth time while a request is in flight.
pub const TABLES_PER_DEVICE: usize = 4;

/// One device's count of its client's tables mapped ([`TABLES_PER_DEVICE`]).
#[derive(Clone, Default)]
pub struct TableCount(std::sync::Arc<AtomicUsize>);

/// One table's place in its device's [`TableCount`], given back when the
/// table is dropped.
struct Counted(TableCount);

impl Counted {
    fn take(count: &TableCount) -> Result<Self, TableError> {
        let taken = count.0.fetch_add(1, Ordering::AcqRel);
        let counted = Counted(count.clone());
        if taken >= TABLES_PER_DEVICE {
            return Err(TableError::TooManyTables);
        }
        Ok(counted)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Checks every region of a client's table against its backing file: a
/// region must lie inside its file, so that touching it cannot fault.
pub fn check_table(memory: &GuestMemoryMmap) -> Result<(), TableError> {
    for (index, region) in memory.iter().enumerate() {
        let Some(file_offset) = region.file_offset() else { continue };
        let file = file_offset.file();
        // SAFETY: fstat on a descriptor the region owns, into a zeroed stat.
        let stat = unsafe {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(file.as_raw_fd(), &mut stat) != 0 {
                return Err(TableError::Stat { index, source: std::io::Error::last_os_error() });
            }
            stat
        };
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(TableError::NotAFile { index, mode: stat.st_mode });
        }
        let size = region.len();
        let offset = file_offset.start();
        let file_size = stat.st_size.max(0) as u64;
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(TableError::BeyondFile { index, guest: region.start_addr().0, size, offset, file_size });
        }
    }
    Ok(())
}

/// How many client regions can be guarded at once: a table holds at most
/// [`REGIONS_PER_TABLE`] (8) and a device at most [`TABLES_PER_DEVICE`]
/// (4), so this covers [`MOST_DEVICES`] (512) whose clients all hold their
/// most, and a reflector serves no more (`Config::validate`): one tenant's
/// clients can take only their own devices' share. With 8,192, clients of
/// 256 devices holding their most took every slot of a reflector allowed
/// 500, and every other device's client was refused (a review found it).
/// Past it a new table is refused (`GuardFull`) and its client's
/// connection ends. 32 bytes a slot, 512 KiB in all, touched only as used.
pub const REGISTRY_SLOTS: usize = 16384;

/// The most devices one reflector serves: each gets its clients' most
/// tables of regions in the SIGBUS guard ([`REGISTRY_SLOTS`]).
pub const MOST_DEVICES: usize = REGISTRY_SLOTS / (TABLES_PER_DEVICE * REGIONS_PER_TABLE);

/// One guarded address range. `end == 0` marks a free slot; a slot is
/// claimed through `owner` before its range is written.
struct Slot {
    owner: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    owner: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

/// The ranges the SIGBUS handler may absorb faults in. A fixed array of
/// atomics: the handler can neither lock nor allocate.
static SLOTS: [Slot; REGISTRY_SLOTS] = [FREE; REGISTRY_SLOTS];

static INSTALL: Once = Once::new();

/// A client's memory table as the reflector uses it: the mapping
/// [`accept`] checked, registered with the SIGBUS guard for as long as any
/// clone of this lives.
///
/// vhost-user-backend swaps a new table into its own view (the vrings'
/// too) before it tells the device, and a worker may be inside an event
/// then: the reflector touches client memory only through this snapshot,
/// never through a vring's own view (`clippy.toml` forbids the vring
/// methods that use it), so nothing reads a table before it is checked and
/// registered.
#[derive(Clone)]
pub struct ClientMemory(std::sync::Arc<Checked>);

struct Checked {
    // Declared first, so dropped first: the mapping goes before its
    // registration.
    mapping: std::sync::Arc<GuestMemoryMmap>,
    registration: Registration,
    counted: Option<Counted>,
    /// Its device (that device's count): only its threads reap it.
    owner: TableCount,
}

/// A table the device let go of while vhost-user-backend still maps it:
/// its registration lives on until the mapping does not. A client the
/// device cut off keeps its connection, and the handler touches the table
/// it holds (`SET_VRING_ADDR` reads the used index): a guard released
/// with the device's snapshot let that client's truncated memfd kill the
/// reflector with SIGBUS.
///
/// Only its own device's threads reap it ([`reap_retired`]): unmapping a
/// table closes the client's descriptors behind it, and the last close of
/// a file on a FUSE filesystem the client serves waits on the client (its
/// `FLUSH`), for ever if it never answers. Reaped by another device's
/// watch, one client held up every device whose watch came next.
struct Retired {
    // Dropped first, as in `Checked`.
    mapping: std::sync::Arc<GuestMemoryMmap>,
    _registration: Registration,
    _counted: Option<Counted>,
    owner: TableCount,
}

/// The tables retired and still mapped elsewhere ([`Retired`]).
static RETIRED: std::sync::Mutex<Vec<Retired>> = std::sync::Mutex::new(Vec::new());

impl Drop for Checked {
    fn drop(&mut self) {
        // The count is exact: arc-swap turns the loads it lent out into
        // counted references before it lets go of a value.
        if std::sync::Arc::strong_count(&self.mapping) > 1 {
            let retired = Retired {
                mapping: self.mapping.clone(),
                _registration: Registration { slots: std::mem::take(&mut self.registration.slots) },
                _counted: self.counted.take(),
                owner: self.owner.clone(),
            };
            RETIRED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(retired);
        }
    }
}

/// Unmaps and unregisters the retired tables of the device whose table
/// count is `owner` that nobody else maps any more; how many of its are
/// left. Called by that device with every table it accepts, each of its
/// watch periods, and after each of its connections' end.
pub fn reap_retired(owner: &TableCount) -> usize {
    let mut retired = RETIRED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let ours = |table: &Retired| std::sync::Arc::ptr_eq(&table.owner.0, &owner.0);
    // Taken out of the list first: the unmapping (and the closes) must not
    // hold the lock every device takes.
    let (reaped, kept): (Vec<Retired>, Vec<Retired>) =
        retired.drain(..).partition(|table| ours(table) && std::sync::Arc::strong_count(&table.mapping) == 1);
    *retired = kept;
    let left = retired.iter().filter(|table| ours(table)).count();
    drop(retired);
    // Dropping one whose count is 1 unmaps it (no other holder can appear:
    // nothing else keeps a weak reference) and then releases its slots.
    drop(reaped);
    left
}

impl ClientMemory {
    /// Whether a touch of this memory faulted (see [`Registration::poisoned`]).
    pub fn poisoned(&self) -> bool {
        self.0.registration.poisoned()
    }

    /// The mapping, for what outlives a call (a DMA window).
    pub fn mapping(&self) -> std::sync::Arc<GuestMemoryMmap> {
        self.0.mapping.clone()
    }
}

impl std::ops::Deref for ClientMemory {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.0.mapping
    }
}

impl std::fmt::Debug for ClientMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMemory").field("registration", &self.0.registration).finish()
    }
}

/// A client's memory table, registered with the SIGBUS guard for as long as
/// this lives.
#[derive(Debug)]
pub struct Registration {
    slots: Vec<usize>,
}

impl Registration {
    /// Whether a touch of this client's memory faulted (its file shrank or
    /// ran out of pages): the device must stop serving this client.
    pub fn poisoned(&self) -> bool {
        self.slots.iter().any(|&i| SLOTS[i].poisoned.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for &i in &self.slots {
            let slot = &SLOTS[i];
            slot.end.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
            slot.poisoned.store(false, Ordering::Release);
            slot.owner.store(false, Ordering::Release);
        }
    }
}

/// The address ranges of every client memory table mapped now (start,
/// end): the clients' RAM, which their QEMU owns and the reflector only
/// maps; its pages the reflector touched count in its resident set.
pub fn mapped_ranges() -> Vec<(usize, usize)> {
    SLOTS
        .iter()
        .filter(|slot| slot.owner.load(Ordering::Acquire))
        .filter_map(|slot| {
            // A slot being claimed or released writes start before end and
            // clears end first: a range read between the two ends' loads
            // agreeing, with a start, is whole.
            let end = slot.end.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Acquire);
            (start != 0 && end > start && slot.end.load(Ordering::Acquire) == end).then_some((start, end))
        })
        .collect()
}

/// Resident KiB of this process's mappings that lie inside `ranges`
/// (from `/proc/self/smaps`: a mapping's `Rss`).
pub fn resident_in(ranges: &[(usize, usize)]) -> std::io::Result<u64> {
    if ranges.is_empty() {
        return Ok(0);
    }
    use std::io::BufRead;
    // Line by line: with hundreds of devices the file is megabytes.
    let smaps = std::io::BufReader::new(std::fs::File::open("/proc/self/smaps")?);
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let line = line?;
        // A mapping's first line: `start-end perms offset dev inode path`.
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) {
                // Clients' memory is mapped shared: a private mapping (the
                // reflector's heap, stacks) is never theirs.
                let shared = words.next().is_some_and(|perms| perms.ends_with('s'));
                inside = shared && ranges.iter().any(|&(s, e)| s <= start && end <= e);
                continue;
            }
        }
        if inside {
            if let Some(rss) = line.strip_prefix("Rss:") {
                kib += rss.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    Ok(kib)
}

/// Checks a client's table ([`check_table`]) and registers its mappings
/// with the SIGBUS guard, installing the guard on first use.
pub fn guard(memory: &GuestMemoryMmap) -> Result<Registration, TableError> {
    check_table(memory)?;
    if memory.num_regions() > REGIONS_PER_TABLE {
        return Err(TableError::TooManyRegions { regions: memory.num_regions() });
    }
    install_handler();
    let mut registration = Registration { slots: Vec::new() };
    for region in memory.iter() {
        let start = region.as_ptr() as usize;
        let len = region.len() as usize;
        let index = SLOTS
            .iter()
            .position(|slot| slot.owner.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok())
            .ok_or(TableError::GuardFull)?;
        registration.slots.push(index);
        let slot = &SLOTS[index];
        slot.poisoned.store(false, Ordering::Release);
        slot.start.store(start, Ordering::Release);
        slot.end.store(start.saturating_add(len), Ordering::Release);
    }
    Ok(registration)
}

/// Whether `address` lies in a range registered with the guard.
#[cfg(test)]
pub fn registered(address: usize) -> bool {
    SLOTS.iter().any(|slot| {
        slot.owner.load(Ordering::Acquire)
            && (slot.start.load(Ordering::Acquire)..slot.end.load(Ordering::Acquire)).contains(&address)
    })
}

/// A device accepting `device`'s client's new memory table: [`guard`],
/// within the device's `tables` ([`TABLES_PER_DEVICE`]), with the refusal
/// logged. Refusing the table ends the connection (vhost-user-backend).
pub fn accept(
    device: &str,
    mapping: std::sync::Arc<GuestMemoryMmap>,
    tables: &TableCount,
) -> std::io::Result<ClientMemory> {
    reap_retired(tables);
    let accepted = Counted::take(tables).and_then(|counted| Ok((counted, guard(&mapping)?)));
    match accepted {
        Ok((counted, registration)) => Ok(ClientMemory(std::sync::Arc::new(Checked {
            mapping,
            registration,
            counted: Some(counted),
            owner: tables.clone(),
        }))),
        Err(error) => {
            tracing::error!(device, %error, "refusing the client's memory table");
            Err(std::io::Error::other(error))
        }
    }
}

fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO, which
        // `on_sigbus` expects; sigemptyset on its own mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::error!(error = %std::io::Error::last_os_error(), "cannot install the client memory SIGBUS guard");
            }
        }
    });
}

/// The SIGBUS handler. Async-signal-safe: atomics and mmap only.
extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // si_addr is the faulting address for SIGBUS.
    let address = unsafe { (*info).si_addr() } as usize;
    // Every slot covering the address (a stale one may overlap a new one).
    let covering = || {
        SLOTS.iter().filter(move |slot| {
            let end = slot.end.load(Ordering::Acquire);
            end != 0 && address < end && address >= slot.start.load(Ordering::Acquire)
        })
    };
    if covering().next().is_some() {
        // A hugetlbfs mapping can only be replaced in whole huge pages.
        for page_size in [4096usize, 2 << 20, 1 << 30] {
            let page = address & !(page_size - 1);
            // SAFETY: replaces one page of a client mapping the reflector
            // registered (never its own memory) with a private zero page,
            // so the faulting access completes; the device then cuts the
            // client off (it sees `poisoned`).
            let mapped = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    page_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                covering().for_each(|slot| slot.poisoned.store(true, Ordering::Release));
                return;
            }
        }
    }
    // Not a client's memory: a real bug. Let the fault kill the process.
    // SAFETY: restoring the default action for SIGBUS.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"client-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn table(file: File, size: usize) -> GuestMemoryMmap {
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size).unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap()
    }

    #[test]
    fn a_region_larger_than_its_file_is_refused() {
        let memory = table(memfd(1 << 20), 1 << 30);
        let error = check_table(&memory).unwrap_err();
        assert!(matches!(error, TableError::BeyondFile { file_size: 1048576, .. }), "{error}");
        assert!(guard(&memory).is_err());
        let fine = table(memfd(1 << 20), 1 << 20);
        check_table(&fine).unwrap();
    }

    #[test]
    fn a_shrunk_file_poisons_the_client_instead_of_killing_the_process() {
        use vm_memory::Bytes;
        let file = memfd(64 << 10);
        let memory = table(file.try_clone().unwrap(), 64 << 10);
        let registration = guard(&memory).unwrap();
        memory.write_obj(0x1234_5678u32, GuestAddress(0x8000)).unwrap();
        assert!(!registration.poisoned());
        file.set_len(4096).unwrap();
        // Without the guard this read takes SIGBUS and ends the test binary.
        let value: u32 = memory.read_obj(GuestAddress(0x8000)).unwrap();
        assert_eq!(value, 0, "the faulting page reads as zeros");
        assert!(registration.poisoned());
        // Below the new end the memory is still the client's.
        memory.write_obj(7u32, GuestAddress(0x10)).unwrap();
        let mut byte = [0u8; 4];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut byte, 0x10).unwrap();
        assert_eq!(u32::from_le_bytes(byte), 7);
        drop(registration);
    }

    /// A client that replaces its table while requests in flight hold the
    /// older ones keeps at most [`TABLES_PER_DEVICE`] mapped and guarded;
    /// another device's client is not affected, and a table dropped gives
    /// its place back.
    #[test]
    fn a_device_holds_at_most_its_share_of_its_clients_tables() {
        let (ours, theirs) = (TableCount::default(), TableCount::default());
        let accept_one = |tables: &TableCount| accept("d", std::sync::Arc::new(table(memfd(4096), 4096)), tables);
        let mut held: Vec<ClientMemory> = (0..TABLES_PER_DEVICE).map(|_| accept_one(&ours).unwrap()).collect();
        let Err(refused) = accept_one(&ours) else { panic!("a table past the device's share was mapped") };
        assert!(refused.to_string().contains("still held by requests in flight"), "{refused}");
        let other = accept_one(&theirs).expect("another device's client was refused");
        held.pop();
        let again = accept_one(&ours).expect("a table dropped did not give its place back");
        drop((held, other, again));
        assert_eq!(ours.0.load(Ordering::Acquire), 0);
    }

    /// A retired table is unmapped, and its client's descriptors closed,
    /// only by its own device: the last close of a file on the client's
    /// own FUSE filesystem waits for that client, so another device's
    /// watch reaping it could be held up for ever.
    #[test]
    fn a_device_reaps_only_its_own_retired_tables() {
        let (ours, theirs) = (TableCount::default(), TableCount::default());
        let handlers = std::sync::Arc::new(table(memfd(4096), 4096));
        drop(accept("theirs", handlers.clone(), &theirs).unwrap());
        // Now only the retired list maps it.
        drop(handlers);
        assert_eq!(reap_retired(&ours), 0);
        assert_eq!(theirs.0.load(Ordering::Acquire), 1, "another device reaped this device's table");
        assert_eq!(reap_retired(&theirs), 0);
        assert_eq!(theirs.0.load(Ordering::Acquire), 0, "its own device did not reap it");
    }

    /// A device that lets go of its client's table (it cut the client off)
    /// while vhost-user-backend still maps it: a touch through the
    /// handler's copy after the client shrank its memfd must be absorbed,
    /// as long as that copy lives, and the table is unmapped and its slots
    /// released once it does not.
    #[test]
    fn a_table_stays_guarded_while_anything_still_maps_it() {
        use vm_memory::Bytes;
        let file = memfd(64 << 10);
        let handlers = std::sync::Arc::new(table(file.try_clone().unwrap(), 64 << 10));
        let tables = TableCount::default();
        let accepted = accept("d", handlers.clone(), &tables).unwrap();
        let address = handlers.get_host_address(GuestAddress(0x8000)).unwrap() as usize;
        drop(accepted);
        assert!(registered(address), "the guard let go of a table the handler still maps");
        file.set_len(4096).unwrap();
        // Before the fix this read took SIGBUS and ended the test binary.
        let value: u32 = handlers.read_obj(GuestAddress(0x8000)).unwrap();
        assert_eq!(value, 0, "the faulting page reads as zeros");
        assert_eq!(tables.0.load(Ordering::Acquire), 1, "a table still mapped counts against its device");
        drop(handlers);
        reap_retired(&tables);
        assert!(!registered(address), "a table nobody maps is still registered");
        assert_eq!(tables.0.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_table_of_more_regions_than_a_client_may_send_is_refused() {
        let regions = |count: u64| {
            let regions = (0..count)
                .map(|i| {
                    let region = MmapRegion::from_file(FileOffset::new(memfd(4096), 0), 4096).unwrap();
                    GuestRegionMmap::new(region, GuestAddress(i * 0x10000)).unwrap()
                })
                .collect();
            std::sync::Arc::new(GuestMemoryMmap::from_regions(regions).unwrap())
        };
        let tables = TableCount::default();
        let most = accept("d", regions(REGIONS_PER_TABLE as u64), &tables).expect("a table of 8 regions was refused");
        drop(most);
        let Err(refused) = accept("d", regions(REGIONS_PER_TABLE as u64 + 1), &tables) else {
            panic!("a table of 9 regions was accepted")
        };
        assert!(refused.to_string().contains("more than the 8"), "{refused}");
    }
}
