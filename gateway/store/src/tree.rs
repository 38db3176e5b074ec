//! Disk trees: copy-on-write, content-addressed maps from chunk index to chunk id.
//!
//! A disk of `n` chunks is a fixed-depth radix tree of pages of [`FANOUT`] entries. Leaves
//! (level 0) hold chunk ids, inner pages hold child page ids; the all-zero id means "zero
//! chunk" in a leaf and "all-zero subtree" in an inner page, so an empty or sparse disk costs
//! (almost) no pages. A page's id is a keyed hash of its bytes, so identical pages are stored
//! once and a new recovery point writes only the pages on the paths of changed chunks.
//!
//! [`TreeBuilder`] applies a stream of `(chunk index, id)` updates in ascending order to a base
//! tree, holding one open page per level: memory is `levels × page size`, whatever the disk
//! size. Page layout: `kind u8 (0 leaf, 1 inner) | level u8 | 0u16 | FANOUT × id[32]`.

use crate::ChunkId;
use crate::error::{Result, StoreError};

/// Entries per page.
pub const FANOUT: usize = 256;
/// Bytes of an encoded page.
pub const PAGE_LEN: usize = 4 + FANOUT * 32;
/// Deepest tree accepted (256^8 chunks is far beyond any disk).
pub const MAX_LEVELS: u8 = 8;

/// Loads and stores pages (the vault implements it over packs; tests over a map).
pub trait PageStore {
    /// Loads the page with `id`.
    fn load(&mut self, id: &ChunkId) -> Result<Vec<u8>>;
    /// Stores `page` and returns its id.
    fn store(&mut self, page: Vec<u8>) -> Result<ChunkId>;
}

/// Number of levels for a disk of `chunks` chunks (at least 1).
pub fn levels_for(chunks: u64) -> u8 {
    let mut levels = 1u8;
    let mut cap = FANOUT as u64;
    while cap < chunks {
        levels += 1;
        cap = cap.saturating_mul(FANOUT as u64);
    }
    levels
}

/// Position of page or chunk `n` within its parent page.
fn slot(n: u64) -> usize {
    usize::try_from(n % FANOUT as u64).expect("below FANOUT")
}

fn span(level: u8) -> u64 {
    (FANOUT as u64).pow(u32::from(level) + 1)
}

fn child_span(level: u8) -> u64 {
    (FANOUT as u64).pow(u32::from(level))
}

/// Encodes a page.
pub fn encode_page(level: u8, entries: &[ChunkId]) -> Vec<u8> {
    let mut b = Vec::with_capacity(PAGE_LEN);
    b.push(u8::from(level > 0));
    b.push(level);
    b.extend_from_slice(&[0, 0]);
    for e in entries {
        b.extend_from_slice(&e.0);
    }
    b
}

/// Decodes a page, checking it is at `level`.
pub fn decode_page(id: &ChunkId, level: u8, b: &[u8]) -> Result<Vec<ChunkId>> {
    let bad = |r: &str| StoreError::corrupt(format!("page {id}"), r.to_string());
    if b.len() != PAGE_LEN {
        return Err(bad("wrong length"));
    }
    if b[0] != u8::from(level > 0) || b[1] != level {
        return Err(bad("page is not at the level its parent says"));
    }
    Ok(b[4..]
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            ChunkId(a)
        })
        .collect())
}

#[derive(Debug)]
struct OpenPage {
    number: u64,
    entries: Vec<ChunkId>,
    dirty: bool,
}

/// Applies ascending updates to a base tree, writing only changed pages.
#[derive(Debug)]
pub struct TreeBuilder {
    levels: u8,
    base_root: ChunkId,
    root: Option<ChunkId>,
    open: Vec<Option<OpenPage>>,
    next_min: u64,
    chunks: u64,
}

impl TreeBuilder {
    /// A builder for a disk of `chunks` chunks over `base` (`ChunkId::ZERO` for none).
    pub fn new(chunks: u64, base: ChunkId) -> Self {
        let levels = levels_for(chunks);
        Self {
            levels,
            base_root: base,
            root: None,
            open: (0..levels).map(|_| None).collect(),
            next_min: 0,
            chunks,
        }
    }

    /// Levels of the tree.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Sets chunk `index` to `id` (`ChunkId::ZERO` for a zero chunk). Indexes must ascend.
    pub fn set(&mut self, store: &mut dyn PageStore, index: u64, id: ChunkId) -> Result<()> {
        if index < self.next_min || index >= self.chunks {
            return Err(StoreError::InvalidArgument(format!(
                "tree update for chunk {index} out of order or past the disk's {} chunks",
                self.chunks
            )));
        }
        self.next_min = index + 1;
        for l in (0..self.levels).rev() {
            let number = index / span(l);
            if self.open[l as usize]
                .as_ref()
                .is_some_and(|p| p.number == number)
            {
                continue;
            }
            for k in 0..=l {
                self.close(store, k)?;
            }
            let base = if l + 1 == self.levels {
                self.base_root
            } else {
                let parent = self.open[l as usize + 1]
                    .as_ref()
                    .expect("parent level is open");
                parent.entries[slot(number)]
            };
            let entries = if base.is_zero() {
                vec![ChunkId::ZERO; FANOUT]
            } else {
                decode_page(&base, l, &store.load(&base)?)?
            };
            self.open[l as usize] = Some(OpenPage {
                number,
                entries,
                dirty: false,
            });
        }
        let leaf = self.open[0].as_mut().expect("leaf is open");
        let slot = slot(index);
        if leaf.entries[slot] != id {
            leaf.entries[slot] = id;
            leaf.dirty = true;
        }
        Ok(())
    }

    fn close(&mut self, store: &mut dyn PageStore, l: u8) -> Result<()> {
        let Some(page) = self.open[l as usize].take() else {
            return Ok(());
        };
        if !page.dirty {
            return Ok(());
        }
        let id = if page.entries.iter().all(ChunkId::is_zero) {
            ChunkId::ZERO
        } else {
            store.store(encode_page(l, &page.entries))?
        };
        if l + 1 == self.levels {
            self.root = Some(id);
        } else {
            let parent = self.open[l as usize + 1]
                .as_mut()
                .expect("parent level is open while a child is");
            let slot = slot(page.number);
            if parent.entries[slot] != id {
                parent.entries[slot] = id;
                parent.dirty = true;
            }
        }
        Ok(())
    }

    /// Writes the remaining open pages and returns the new root id.
    pub fn finish(mut self, store: &mut dyn PageStore) -> Result<ChunkId> {
        for l in 0..self.levels {
            self.close(store, l)?;
        }
        Ok(self.root.unwrap_or(self.base_root))
    }
}

/// Calls `f(first_chunk_index, entries)` for every leaf that is not all-zero, in order,
/// loading only pages that exist. `on_page` sees every page id visited (for verification).
pub fn walk_leaves(
    store: &mut dyn PageStore,
    root: ChunkId,
    levels: u8,
    on_page: &mut dyn FnMut(&ChunkId, u8) -> Result<()>,
    f: &mut dyn FnMut(u64, &[ChunkId]) -> Result<()>,
) -> Result<()> {
    if levels == 0 || levels > MAX_LEVELS {
        return Err(StoreError::InvalidArgument(format!(
            "tree of {levels} levels"
        )));
    }
    fn rec(
        store: &mut dyn PageStore,
        id: ChunkId,
        level: u8,
        first: u64,
        on_page: &mut dyn FnMut(&ChunkId, u8) -> Result<()>,
        f: &mut dyn FnMut(u64, &[ChunkId]) -> Result<()>,
    ) -> Result<()> {
        if id.is_zero() {
            return Ok(());
        }
        on_page(&id, level)?;
        let entries = decode_page(&id, level, &store.load(&id)?)?;
        if level == 0 {
            return f(first, &entries);
        }
        for (i, child) in entries.iter().enumerate() {
            rec(
                store,
                *child,
                level - 1,
                first + i as u64 * child_span(level),
                on_page,
                f,
            )?;
        }
        Ok(())
    }
    rec(store, root, levels - 1, 0, on_page, f)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::crypto::MasterKeys;

    #[derive(Default)]
    struct MapStore {
        keys: Option<MasterKeys>,
        pages: HashMap<ChunkId, Vec<u8>>,
        loads: usize,
        stores: usize,
    }

    impl PageStore for MapStore {
        fn load(&mut self, id: &ChunkId) -> Result<Vec<u8>> {
            self.loads += 1;
            self.pages
                .get(id)
                .cloned()
                .ok_or_else(|| StoreError::MissingObject(id.to_string()))
        }
        fn store(&mut self, page: Vec<u8>) -> Result<ChunkId> {
            self.stores += 1;
            let id = self
                .keys
                .get_or_insert_with(MasterKeys::generate)
                .page_id(&page);
            self.pages.insert(id, page);
            Ok(id)
        }
    }

    fn cid(n: u64) -> ChunkId {
        let mut a = [0u8; 32];
        a[..8].copy_from_slice(&(n + 1).to_le_bytes());
        ChunkId(a)
    }

    fn read_all(s: &mut MapStore, root: ChunkId, levels: u8, n: u64) -> Vec<ChunkId> {
        let mut out = vec![ChunkId::ZERO; n as usize];
        walk_leaves(s, root, levels, &mut |_, _| Ok(()), &mut |first, e| {
            for (i, id) in e.iter().enumerate() {
                let idx = first as usize + i;
                if idx < out.len() {
                    out[idx] = *id;
                } else {
                    assert!(id.is_zero());
                }
            }
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn levels() {
        assert_eq!(levels_for(0), 1);
        assert_eq!(levels_for(256), 1);
        assert_eq!(levels_for(257), 2);
        assert_eq!(levels_for(65536), 2);
        assert_eq!(levels_for(65537), 3);
    }

    #[test]
    fn cow_updates_touch_only_changed_paths() {
        let n = 70_000u64; // three levels
        let mut s = MapStore::default();
        let mut b = TreeBuilder::new(n, ChunkId::ZERO);
        let mut want = vec![ChunkId::ZERO; n as usize];
        for i in (0..n).step_by(3) {
            b.set(&mut s, i, cid(i)).unwrap();
            want[i as usize] = cid(i);
        }
        assert_eq!(b.levels(), 3);
        let root1 = b.finish(&mut s).unwrap();
        assert_eq!(read_all(&mut s, root1, 3, n), want);

        // Change three chunks: 3 leaves + their inner pages + root are written.
        s.stores = 0;
        s.loads = 0;
        let mut b = TreeBuilder::new(n, root1);
        for (i, id) in [
            (5u64, cid(999_999)),
            (40_002, ChunkId::ZERO),
            (69_999, cid(7)),
        ] {
            b.set(&mut s, i, id).unwrap();
            want[i as usize] = id;
        }
        let root2 = b.finish(&mut s).unwrap();
        assert!(s.stores <= 3 + 3 + 1, "wrote {} pages", s.stores);
        assert!(s.loads <= 7, "loaded {} pages", s.loads);
        assert_eq!(read_all(&mut s, root2, 3, n), want);
        // The old tree is untouched.
        let before = read_all(&mut s, root1, 3, n);
        assert_eq!(before[5], ChunkId::ZERO);
        assert_eq!(before[40_002], cid(40_002));

        // No changes: same root, nothing written.
        s.stores = 0;
        let b = TreeBuilder::new(n, root2);
        assert_eq!(b.finish(&mut s).unwrap(), root2);
        assert_eq!(s.stores, 0);
    }

    #[test]
    fn zeroing_everything_gives_the_zero_root_and_order_is_enforced() {
        let mut s = MapStore::default();
        let mut b = TreeBuilder::new(600, ChunkId::ZERO);
        b.set(&mut s, 10, cid(1)).unwrap();
        b.set(&mut s, 599, cid(2)).unwrap();
        let r = b.finish(&mut s).unwrap();
        let mut b = TreeBuilder::new(600, r);
        b.set(&mut s, 10, ChunkId::ZERO).unwrap();
        assert!(b.set(&mut s, 9, ChunkId::ZERO).is_err());
        b.set(&mut s, 599, ChunkId::ZERO).unwrap();
        assert!(b.set(&mut s, 600, ChunkId::ZERO).is_err());
        assert_eq!(b.finish(&mut s).unwrap(), ChunkId::ZERO);
    }

    #[test]
    fn identical_content_gives_identical_roots() {
        let mut s = MapStore::default();
        let mut roots = Vec::new();
        for _ in 0..2 {
            let mut b = TreeBuilder::new(1000, ChunkId::ZERO);
            for i in 0..1000 {
                b.set(&mut s, i, cid(i % 7)).unwrap();
            }
            roots.push(b.finish(&mut s).unwrap());
        }
        assert_eq!(roots[0], roots[1]);
    }

    #[test]
    fn a_page_at_the_wrong_level_is_corrupt() {
        let p = encode_page(0, &vec![ChunkId::ZERO; FANOUT]);
        assert!(decode_page(&ChunkId::ZERO, 1, &p).is_err());
        assert!(decode_page(&ChunkId::ZERO, 0, &p[..10]).is_err());
    }
}
