//! The block window: the one `ListSnapshotBlocks` page the disk keeps, and how it is fetched.
//!
//! It exists because a snapshot may have far too many blocks to list up front (a 64 TiB volume
//! has 128 Mi blocks of 512 KiB, with a token each), while reads and layout queries walk the
//! volume mostly forward. So the disk keeps one page: the blocks it lists, and the range of
//! block indices it is authoritative for (from the index it was asked for to its last listed
//! block, or to the end of the volume on the last page). A block outside that range is looked
//! up by listing again from that block (`startingBlockIndex`). Memory stays at one page
//! whatever the volume size.

use ferry_plugin_sdk::adapter::Error;

use crate::api::{self, Client, Geometry, ListedBlock};

/// Most pages in a row that list no block before a listing is declared stuck.
pub const MAX_EMPTY_PAGES: u32 = 8;

/// Block tokens are refreshed when the clock is this close to their `ExpiryTime` (60 s).
pub const EXPIRY_MARGIN_MS: u64 = 60_000;

/// One page of `ListSnapshotBlocks` and the block indices it is authoritative for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Window {
    /// First block index covered.
    start: u64,
    /// One past the last block index covered.
    end: u64,
    /// The listed blocks of `[start, end)`, strictly increasing.
    blocks: Vec<ListedBlock>,
    /// When the tokens must be refreshed (`ExpiryTime` minus [`EXPIRY_MARGIN_MS`]).
    fresh_until_ms: Option<u64>,
}

impl Window {
    /// Whether the window knows whether block `index` is listed.
    pub(crate) fn covers(&self, index: u64) -> bool {
        (self.start..self.end).contains(&index)
    }

    /// Whether the tokens are due for a refresh at `now_ms`.
    pub(crate) fn stale(&self, now_ms: impl FnOnce() -> u64) -> bool {
        self.fresh_until_ms.is_some_and(|t| now_ms() >= t)
    }

    /// The token of block `index`, if it is listed (the window must cover it).
    pub(crate) fn token(&self, index: u64) -> Option<&str> {
        self.blocks
            .binary_search_by_key(&index, |b| b.index)
            .ok()
            .and_then(|i| self.blocks.get(i))
            .map(|b| b.token.as_str())
    }

    /// From block `index` (covered): whether it is listed, and the end of the run of blocks
    /// that are all listed or all unlisted with it (within the window).
    pub(crate) fn run(&self, index: u64) -> (bool, u64) {
        let at = self.blocks.partition_point(|b| b.index < index);
        match self.blocks.get(at) {
            Some(b) if b.index == index => {
                let mut end = index + 1;
                for b in &self.blocks[at + 1..] {
                    if b.index != end {
                        break;
                    }
                    end += 1;
                }
                (true, end)
            }
            Some(b) => (false, b.index),
            None => (false, self.end),
        }
    }

    /// Number of blocks held (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }
}

/// `ListSnapshotBlocks` of `snapshot` from block `start`, following `NextToken` past pages
/// that list nothing, into a window that covers `start`. With `known` geometry every page must
/// agree with it; without (when opening), the first page must report a valid one, which is
/// returned.
///
/// A listed block below `start` is ignored (some emulators ignore `startingBlockIndex`); the
/// rest must be strictly increasing and within the volume. A `NextToken` equal to the token
/// just sent, or more than [`MAX_EMPTY_PAGES`] empty pages in a row, is an error: a server
/// that does not advance cannot keep the plugin busy forever.
///
/// # Errors
/// The call's HTTP or transport error, or [`Error::Invalid`] naming what the page got wrong.
pub(crate) fn fetch(
    client: &Client,
    snapshot: &str,
    start: u64,
    known: Option<Geometry>,
) -> Result<(Geometry, Window), Error> {
    let ctx = format!("ListSnapshotBlocks of {snapshot}");
    let mut geometry = known;
    let mut token: Option<String> = None;
    let mut empty_pages = 0;
    loop {
        let url = client.list_snapshot_blocks_url(snapshot, token.as_deref(), start);
        let response = api::get(&ctx, url)?;
        api::check_status(&ctx, &response)?;
        let page = api::parse_snapshot_blocks(&ctx, &response.body)?;
        let g = match geometry {
            Some(g) => {
                g.check_same(&ctx, page.block_size, page.volume_gib)?;
                g
            }
            None => {
                let (Some(bs), Some(gib)) = (page.block_size, page.volume_gib) else {
                    return Err(Error::invalid(format!(
                        "{ctx}: the first page reports no {}",
                        if page.block_size.is_none() {
                            "BlockSize"
                        } else {
                            "VolumeSize"
                        }
                    )));
                };
                Geometry::new(&ctx, bs, gib)?
            }
        };
        geometry = Some(g);
        api::check_indices(&ctx, page.entries.iter().map(|b| b.index), None, g.blocks())?;
        let mut blocks = page.entries;
        blocks.retain(|b| b.index >= start);
        let fresh_until_ms = page.expiry_ms.map(|ms| ms.saturating_sub(EXPIRY_MARGIN_MS));
        let end = match (&page.next_token, blocks.last()) {
            (None, _) => g.blocks(),
            (Some(_), Some(last)) => last.index + 1,
            (Some(next), None) => {
                if token.as_deref() == Some(next.as_str()) {
                    return Err(Error::invalid(format!(
                        "{ctx}: NextToken repeats the page token just sent (the listing does not advance)"
                    )));
                }
                empty_pages += 1;
                if empty_pages > MAX_EMPTY_PAGES {
                    return Err(Error::invalid(format!(
                        "{ctx}: {empty_pages} pages in a row list no block from index {start} (the listing does not advance)"
                    )));
                }
                token = page.next_token;
                continue;
            }
        };
        return Ok((
            g,
            Window {
                start,
                end,
                blocks,
                fresh_until_ms,
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: u64, end: u64, listed: &[u64]) -> Window {
        Window {
            start,
            end,
            blocks: listed
                .iter()
                .map(|&index| ListedBlock {
                    index,
                    token: format!("t{index}"),
                })
                .collect(),
            fresh_until_ms: None,
        }
    }

    #[test]
    fn runs_and_tokens() {
        let w = window(2, 20, &[3, 4, 5, 9, 11, 12]);
        assert!(!w.covers(1) && w.covers(2) && w.covers(19) && !w.covers(20));
        assert_eq!(w.run(2), (false, 3));
        assert_eq!(w.run(3), (true, 6));
        assert_eq!(w.run(4), (true, 6));
        assert_eq!(w.run(6), (false, 9));
        assert_eq!(w.run(11), (true, 13));
        assert_eq!(w.run(13), (false, 20));
        assert_eq!(w.token(9), Some("t9"));
        assert_eq!(w.token(10), None);
        assert!(!w.stale(|| u64::MAX));
        let mut w = w;
        w.fresh_until_ms = Some(100);
        assert!(!w.stale(|| 99));
        assert!(w.stale(|| 100));
        assert!(!Window::default().covers(0));
    }
}
