//! Low-level expert I/O: files opened for buffered and direct reads, page-aligned buffers
//! recycled through a pool, and a persistent pool of I/O threads.
//!
//! One `pread` per contiguous range, all of a layer's experts in flight at once, and no
//! mmap page faults on the hot path: that is what the original engine measured to be fastest.

use std::alloc::{Layout, dealloc};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use memmap2::Mmap;

use super::blob::Blob;
use crate::error::{Error, Result};

/// Alignment of expert buffers, offsets and lengths for `O_DIRECT` (a page).
pub const DIRECT_ALIGN: usize = 4096;

/// How expert bytes are read from disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Buffered `pread`: the OS page cache keeps warm experts.
    PageCache,
    /// `O_DIRECT` `pread`: bypasses the page cache.
    Direct,
}

/// Whether a read was served from the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warmth {
    /// Entirely from the page cache.
    Warm,
    /// At least partly from the device.
    Cold,
    /// The kernel cannot tell us (no `RWF_NOWAIT` support).
    Unknown,
}

/// A file experts are read from, opened lazily for direct I/O and for mapping.
pub struct SourceFile {
    pub path: PathBuf,
    buffered: File,
    direct: OnceLock<std::result::Result<File, String>>,
    map: OnceLock<std::result::Result<Blob, String>>,
    len: u64,
}

/// Set once the kernel has refused `RWF_NOWAIT`, so we stop asking.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

impl SourceFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let buffered = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = buffered.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Arc::new(SourceFile {
            path: path.to_path_buf(),
            buffered,
            direct: OnceLock::new(),
            map: OnceLock::new(),
            len,
        }))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn direct_file(&self) -> Result<&File> {
        let opened = self.direct.get_or_init(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.path)
                .map_err(|e| format!("cannot open for direct I/O (O_DIRECT; tmpfs does not support it): {e}"))
        });
        opened
            .as_ref()
            .map_err(|m| Error::io(&self.path, std::io::Error::other(m.clone())))
    }

    /// The whole file, memory-mapped (for `--io mmap`).
    pub fn mapped(&self) -> Result<Blob> {
        let map = self.map.get_or_init(|| {
            // SAFETY: read-only map; truncation under us is outside our control, as for any mmap.
            let map = unsafe { Mmap::map(&self.buffered) }.map_err(|e| e.to_string())?;
            let len = map.len();
            Ok(Blob::slice_of(Arc::new(map), 0, len))
        });
        map.clone().map_err(|m| Error::io(&self.path, std::io::Error::other(m)))
    }

    fn check_covers(&self, end: u64) -> Result<()> {
        if end <= self.len {
            return Ok(());
        }
        Err(Error::io(
            &self.path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("needs bytes up to {end} but the file has {} (truncated?)", self.len),
            ),
        ))
    }

    /// Fills `buf` from `offset` through the page cache.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Result<Warmth> {
        self.check_covers(offset + buf.len() as u64)?;
        let done = self.read_cached_part(buf, offset);
        if done == buf.len() {
            return Ok(Warmth::Warm);
        }
        self.buffered
            .read_exact_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(if NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
            Warmth::Unknown
        } else {
            Warmth::Cold
        })
    }

    /// An `O_DIRECT` read into `buf` from `offset` (both page-aligned, `buf` a whole number of
    /// pages) that must cover the file up to `needed`; the part of `buf` past the end of the
    /// file is left as it was.
    pub fn read_direct(&self, buf: &mut [u8], offset: u64, needed: u64) -> Result<()> {
        self.check_covers(needed)?;
        let file = self.direct_file()?;
        let mut done = 0usize;
        while offset + (done as u64) < needed {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        self.check_covers(needed).and_then(|()| {
            if offset + done as u64 >= needed {
                Ok(())
            } else {
                Err(Error::io(
                    &self.path,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short direct read"),
                ))
            }
        })
    }

    /// Reads what the page cache already holds from the start of the range, without
    /// blocking on the device (`preadv2` with `RWF_NOWAIT`). Returns the bytes read.
    fn read_cached_part(&self, buf: &mut [u8], offset: u64) -> usize {
        if NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
            return 0;
        }
        let mut done = 0;
        while done < buf.len() {
            let iov = libc::iovec {
                iov_base: buf[done..].as_mut_ptr().cast(),
                iov_len: buf.len() - done,
            };
            // SAFETY: the iovec points into `buf`, which outlives the call.
            let n = unsafe {
                libc::preadv2(
                    self.buffered.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n <= 0 {
                let err = std::io::Error::last_os_error().raw_os_error();
                if n < 0 && matches!(err, Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)) {
                    NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                break;
            }
            done += n as usize;
        }
        done
    }
}

/// A zeroed, page-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1).next_multiple_of(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("buffer size fits a layout")
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed, then written) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// Host memory for expert buffers: page-aligned, writable by reads, readable by copies.
pub trait HostBuffer: Send + Sync {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl HostBuffer for AlignedBuf {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// Makes a host buffer of the given length; a GPU backend supplies page-locked memory so
/// that copies to the device run at full speed without staging.
pub type HostAllocator = dyn Fn(usize) -> Box<dyn HostBuffer> + Send + Sync;

/// Recycles buffers by size so the hot path does not map and fault fresh pages for every
/// expert. Holds at most `max_idle_bytes` of idle buffers.
pub struct BufferPool {
    idle: Mutex<HashMap<usize, Vec<Box<dyn HostBuffer>>>>,
    max_idle_bytes: usize,
    alloc: Arc<HostAllocator>,
}

impl BufferPool {
    /// A pool of ordinary (pageable) page-aligned buffers.
    pub fn new(max_idle_bytes: usize) -> Arc<Self> {
        Self::with_allocator(
            max_idle_bytes,
            Arc::new(|len| Box::new(AlignedBuf::new(len)) as Box<dyn HostBuffer>),
        )
    }

    pub fn with_allocator(max_idle_bytes: usize, alloc: Arc<HostAllocator>) -> Arc<Self> {
        Arc::new(BufferPool {
            idle: Mutex::default(),
            max_idle_bytes,
            alloc,
        })
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let reused = self.lock().get_mut(&len).and_then(Vec::pop);
        PooledBuf {
            buf: Some(reused.unwrap_or_else(|| (self.alloc)(len))),
            len,
            pool: Arc::clone(self),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Vec<Box<dyn HostBuffer>>>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn give_back(&self, len: usize, buf: Box<dyn HostBuffer>) {
        let mut idle = self.lock();
        let held: usize = idle.iter().map(|(len, v)| len * v.len()).sum();
        if held + len <= self.max_idle_bytes {
            idle.entry(len).or_default().push(buf);
        }
    }
}

/// A buffer that returns to its pool when dropped.
pub struct PooledBuf {
    buf: Option<Box<dyn HostBuffer>>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => &mut b.bytes_mut()[..self.len],
            None => &mut [],
        }
    }

    /// Freezes the buffer into a shareable blob of its first `len` bytes.
    pub fn into_blob(self, len: usize) -> Blob {
        Blob::slice_of(Arc::new(self), 0, len)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.bytes()[..self.len])
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(self.len, buf);
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Persistent I/O threads, kept off the compute thread pool: a blocking read on a compute
/// worker would stall the math.
pub struct IoPool {
    sender: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    pub fn new(threads: usize) -> Self {
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let receiver = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("flash-moe-io-{i}"))
                    .spawn(move || {
                        for job in receiver {
                            job();
                        }
                    })
                    .expect("spawning an I/O thread")
            })
            .collect();
        IoPool {
            sender: Some(sender),
            threads,
        }
    }

    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(sender) = &self.sender {
            // The receivers live as long as the pool, so sending cannot fail.
            let _ = sender.send(Box::new(job));
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.sender.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the kernel reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_recycles_and_stays_bounded() {
        let pool = BufferPool::new(8192);
        let a = pool.take(4096);
        let ptr = a.as_ref().as_ptr();
        drop(a);
        let b = pool.take(4096);
        assert_eq!(b.as_ref().as_ptr(), ptr, "the idle buffer is reused");
        assert_eq!(ptr as usize % DIRECT_ALIGN, 0, "page-aligned");
        let (c, d, e) = (pool.take(4096), pool.take(4096), pool.take(4096));
        drop((b, c, d, e));
        let idle: usize = pool.lock().values().map(Vec::len).sum();
        assert_eq!(idle, 2, "at most 8192 idle bytes kept");
    }
}
