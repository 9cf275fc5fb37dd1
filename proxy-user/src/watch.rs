//! inotify on the manifest directory (or on the directory holding the
//! manifest file), so a change is seen at once and names the files to
//! re-read. Polling stays as a safety net in the agent's loop.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What a batch of events asks for.
pub enum Events {
    /// These paths may have changed.
    Paths(BTreeSet<PathBuf>),
    /// The kernel dropped events (queue overflow): rescan everything.
    Rescan,
}

pub struct Inotify {
    fd: OwnedFd,
    dir: PathBuf,
    /// Watching a single file: only events for this name count.
    only: Option<PathBuf>,
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Inotify {
    pub fn new(root: &Path) -> io::Result<Self> {
        let (dir, only) = if root.is_dir() {
            (root.to_path_buf(), None)
        } else {
            let parent = match root.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (parent, Some(root.to_path_buf()))
        };
        // SAFETY: plain syscalls; the fd is owned right away.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cdir = CString::new(dir.as_os_str().as_bytes())?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CREATE;
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cdir.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, dir, only })
    }

    /// Drains pending events without blocking.
    pub fn read(&self) -> io::Result<Events> {
        let mut paths = BTreeSet::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            let mut off = 0usize;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n as usize {
                // SAFETY: the kernel writes whole events; read unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    return Ok(Events::Rescan);
                }
                let name = &buf[off + hdr..off + hdr + ev.len as usize];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                if !name.is_empty() {
                    let p = self.dir.join(OsStr::from_bytes(name));
                    if self.only.as_ref().is_none_or(|f| *f == p) {
                        paths.insert(p);
                    }
                }
                off += hdr + ev.len as usize;
            }
        }
        Ok(Events::Paths(paths))
    }
}
