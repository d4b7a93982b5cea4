//! `Blob`: a cheap, shareable handle on a byte range that lives either in a memory map of
//! a checkpoint file or in memory the loader built (a reordered or converted tensor).

use std::sync::Arc;

/// A read-only byte range, cloned by reference count.
#[derive(Clone)]
pub struct Blob {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl Blob {
    /// A blob over `owner[start..start + len]`. The caller has checked the range.
    pub fn slice_of(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Self {
        debug_assert!(start + len <= (*owner).as_ref().len());
        Blob { owner, start, len }
    }

    /// A blob owning `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Blob {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    /// A sub-range of this blob. Panics if out of range: callers slice by sizes they checked.
    pub fn sub(&self, start: usize, len: usize) -> Blob {
        assert!(start + len <= self.len, "blob sub-range out of bounds");
        Blob {
            owner: Arc::clone(&self.owner),
            start: self.start + start,
            len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len)
    }
}
