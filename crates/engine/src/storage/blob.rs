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

    /// The smallest blob holding all of `parts` and each part's offset in it, when they are
    /// ranges of one buffer (an expert record's segments); `None` when they are not.
    pub fn enclosing(parts: &[&Blob]) -> Option<(Blob, Vec<usize>)> {
        let first = parts.first()?;
        let owner = |b: &Blob| Arc::as_ptr(&b.owner) as *const u8;
        if parts.iter().any(|b| owner(b) != owner(first)) {
            return None;
        }
        let start = parts.iter().map(|b| b.start).min()?;
        let end = parts.iter().map(|b| b.start + b.len).max()?;
        let span = first.sub_of_owner(start, end - start);
        Some((span, parts.iter().map(|b| b.start - start).collect()))
    }

    fn sub_of_owner(&self, start: usize, len: usize) -> Blob {
        Blob {
            owner: Arc::clone(&self.owner),
            start,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enclosing_spans_the_parts_of_one_buffer() {
        let record = Blob::from_vec((0..100u8).collect());
        let (a, b) = (record.sub(10, 5), record.sub(40, 20));
        let Some((span, offsets)) = Blob::enclosing(&[&b, &a]) else {
            panic!("parts of one buffer have an enclosing blob");
        };
        assert_eq!(span.bytes(), &record.bytes()[10..60]);
        assert_eq!(offsets, [30, 0]);
        assert_eq!(&span.bytes()[offsets[0]..offsets[0] + b.len()], b.bytes());
        let other = Blob::from_vec(vec![0; 8]);
        assert!(Blob::enclosing(&[&a, &other]).is_none());
    }
}
