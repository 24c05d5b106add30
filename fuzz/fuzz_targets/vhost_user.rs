//! vhost-user messages as a hostile frontend sends them, over a real Unix
//! socket, with descriptors: the protocol parser (the project's patched
//! `vhost` copy), vhost-user-backend's request handling (features, vrings,
//! memory table mapping, config space) and the reflector's acceptance of the
//! client's memory ([`reflector::client_memory::accept`], exactly as the
//! devices call it). Structure-aware: messages are built from their fields,
//! memory tables from regions on memfds of chosen sizes, so inputs get past
//! the header checks; `Raw` keeps any request code and payload reachable.
//!
//! The device behind it is a stand-in with the block device's features and
//! a config space: chain walking and marshaling have targets of their own
//! (blk_chain, net_chain). Nothing may panic, hang or take the process down.
#![no_main]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Once, RwLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reflector::client_vring::ClientVring;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// One region of a memory table, on a memfd of `file_pages` pages.
#[derive(Arbitrary, Debug)]
struct Region {
    gpa_pages: u16,
    size_pages: u8,
    offset_pages: u8,
    file_pages: u8,
    user_addr: u32,
}

#[derive(Arbitrary, Debug)]
enum Message {
    Raw { request: u8, need_reply: bool, payload: Vec<u8>, fds: u8 },
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    MemTable { regions: Vec<Region>, need_reply: bool },
    VringNum { index: u8, num: u16 },
    VringAddr { index: u8, flags: u8, desc: u32, used: u32, avail: u32 },
    VringBase { index: u8, base: u16 },
    GetVringBase { index: u8 },
    VringFd { request: u8, index: u8, with_fd: bool },
    VringEnable { index: u8, enable: bool },
    GetConfig { offset: u8, size: u8, flags: u8 },
    SetConfig { offset: u8, data: Vec<u8> },
}

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
/// SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR.
const VRING_FD_REQUESTS: [u32; 3] = [12, 13, 14];
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
/// Header flags: protocol version 1, and "reply with an ack".
const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const PAGE: u64 = 4096;

/// Bytes and descriptors of one message on the wire.
struct Wire {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn memfd(pages: u8) -> Option<OwnedFd> {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    (unsafe { libc::ftruncate(fd.as_raw_fd(), i64::from(pages) * PAGE as i64) } == 0).then_some(fd)
}

fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd(2); the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wire(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Wire {
    let mut bytes = Vec::with_capacity(12 + payload.len());
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&(VERSION_1 | flags).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    Wire { bytes, fds }
}

fn u64_payload(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

fn state(index: u8, num: u32) -> Vec<u8> {
    [u32::from(index).to_le_bytes(), num.to_le_bytes()].concat()
}

impl Message {
    fn encode(self) -> Option<Wire> {
        let reply = |need: bool| if need { NEED_REPLY } else { 0 };
        Some(match self {
            Message::Raw { request, need_reply, payload, fds } => {
                let fds = (0..fds % 4).map(|_| eventfd()).collect::<Option<Vec<_>>>()?;
                wire(u32::from(request % 48), reply(need_reply), &payload[..payload.len().min(512)], fds)
            }
            Message::GetFeatures => wire(GET_FEATURES, 0, &[], Vec::new()),
            Message::SetFeatures(features) => wire(SET_FEATURES, 0, &u64_payload(features), Vec::new()),
            Message::SetOwner => wire(SET_OWNER, 0, &[], Vec::new()),
            Message::GetProtocolFeatures => wire(GET_PROTOCOL_FEATURES, 0, &[], Vec::new()),
            Message::SetProtocolFeatures(features) => {
                wire(SET_PROTOCOL_FEATURES, 0, &u64_payload(features), Vec::new())
            }
            Message::MemTable { regions, need_reply } => {
                let regions = &regions[..regions.len().min(9)];
                let mut payload = Vec::new();
                payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                payload.extend_from_slice(&0u32.to_le_bytes());
                let mut fds = Vec::new();
                for region in regions {
                    payload.extend_from_slice(&(u64::from(region.gpa_pages) * PAGE).to_le_bytes());
                    payload.extend_from_slice(&(u64::from(region.size_pages) * PAGE).to_le_bytes());
                    payload.extend_from_slice(&(u64::from(region.user_addr) * PAGE).to_le_bytes());
                    payload.extend_from_slice(&(u64::from(region.offset_pages) * PAGE).to_le_bytes());
                    fds.push(memfd(region.file_pages)?);
                }
                wire(SET_MEM_TABLE, reply(need_reply), &payload, fds)
            }
            Message::VringNum { index, num } => wire(SET_VRING_NUM, 0, &state(index, u32::from(num)), Vec::new()),
            Message::VringAddr { index, flags, desc, used, avail } => {
                let mut payload = Vec::new();
                payload.extend_from_slice(&u32::from(index).to_le_bytes());
                payload.extend_from_slice(&u32::from(flags & 1).to_le_bytes());
                for address in [desc, used, avail] {
                    // User addresses: the handler translates them through the
                    // memory table's user_addr ranges (pages from 0).
                    payload.extend_from_slice(&u64::from(address).to_le_bytes());
                }
                payload.extend_from_slice(&0u64.to_le_bytes());
                wire(SET_VRING_ADDR, 0, &payload, Vec::new())
            }
            Message::VringBase { index, base } => wire(SET_VRING_BASE, 0, &state(index, u32::from(base)), Vec::new()),
            Message::GetVringBase { index } => wire(GET_VRING_BASE, 0, &state(index, 0), Vec::new()),
            Message::VringFd { request, index, with_fd } => {
                let request = VRING_FD_REQUESTS[usize::from(request % 3)];
                let no_fd = if with_fd { 0 } else { 0x100 };
                let fds = if with_fd { vec![eventfd()?] } else { Vec::new() };
                wire(request, 0, &u64_payload(u64::from(index) | no_fd), fds)
            }
            Message::VringEnable { index, enable } => {
                wire(SET_VRING_ENABLE, 0, &state(index, u32::from(enable)), Vec::new())
            }
            Message::GetConfig { offset, size, flags } => {
                let mut payload = [u32::from(offset), u32::from(size), u32::from(flags % 2)]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>();
                payload.resize(12 + usize::from(size), 0);
                wire(GET_CONFIG, 0, &payload, Vec::new())
            }
            Message::SetConfig { offset, data } => {
                let data = &data[..data.len().min(256)];
                let mut payload =
                    [u32::from(offset), data.len() as u32, 0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>();
                payload.extend_from_slice(data);
                wire(SET_CONFIG, 0, &payload, Vec::new())
            }
        })
    }
}

/// The device behind the socket: the block device's features and queue
/// counts, a 60-byte config space, and its memory acceptance.
struct StandIn {
    config: Vec<u8>,
    memory: Option<reflector::client_memory::ClientMemory>,
}

impl VhostUserBackendMut for StandIn {
    type Bitmap = ();
    type Vring = ClientVring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        1 << 32 | 1 << 29 | 1 << 28 | 1 << 9 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        reflector::worker::config_read(&self.config, offset, size)
    }

    fn update_memory(&mut self, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.memory = None;
        self.memory = Some(reflector::client_memory::accept(
            "fuzz",
            memory.memory().into_inner(),
            &reflector::client_memory::TableCount::default(),
        )?);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(&mut self, _: u16, _: EventSet, vrings: &[ClientVring], _: usize) -> std::io::Result<()> {
        // A kick: look at the queue as a device would before walking it.
        for vring in vrings {
            let _ = vring.get_ref().get_queue().ready();
        }
        Ok(())
    }
}

fn socket_path() -> String {
    format!("/tmp/driver-vms-fuzz-vhost-user-{}.sock", std::process::id())
}

fuzz_target!(|messages: Vec<Message>| {
    static SETUP: Once = Once::new();
    // libFuzzer's main runs no Rust runtime set-up: a reply written after
    // the frontend hung up must not kill the process.
    // SAFETY: signal(2) with SIG_IGN.
    SETUP.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Some(wires) = messages.into_iter().take(24).map(Message::encode).collect::<Option<Vec<_>>>() else {
        return;
    };
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = UnixListener::bind(&path) else { return };
    let mut listener = Listener::from(listener);
    let device = Arc::new(RwLock::new(StandIn { config: (0..60).collect(), memory: None }));
    let Ok(mut daemon) = VhostUserDaemon::new("fuzz".into(), device, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
    else {
        return;
    };
    let Ok(mut frontend) = UnixStream::connect(&path) else { return };
    let _ = std::fs::remove_file(&path);
    if daemon.start(&mut listener).is_err() {
        return;
    }
    for message in &wires {
        let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if frontend.send_with_fds(&[&message.bytes[..]], &fds).is_err() {
            break;
        }
    }
    // Hang up, then drain the replies until the backend closes its end.
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    let _ = frontend.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut replies = Vec::new();
    if let Err(error) = frontend.read_to_end(&mut replies) {
        if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            panic!("the backend kept a hung-up frontend's connection open for 10 s");
        }
    }
    let _ = daemon.wait();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
});
