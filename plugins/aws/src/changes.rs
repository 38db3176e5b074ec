//! `ListChangedBlocks` as a change set: the blocks that differ between an earlier snapshot and
//! the opened one, one page per `next` call.
//!
//! It exists so that an incremental backup of an EBS snapshot reads only what changed, without
//! the plugin ever holding the whole list (a change set of a large volume can have millions of
//! entries): each `next` fetches at most one page, validates it against the opened snapshot
//! (block size, volume size, indices strictly increasing across pages and within the volume,
//! a `NextToken` that advances) and hands out its blocks as merged `data` extents.

use std::collections::VecDeque;

use ferry_plugin_sdk::adapter::{ChangeSet, Error};
use ferry_plugin_sdk::io::Extent;

use crate::api::{self, Client, Geometry};
use crate::window::MAX_EMPTY_PAGES;

/// The changes from `first` to the opened snapshot, fetched page by page.
#[derive(Debug)]
pub struct EbsChanges {
    client: Client,
    first: String,
    second: String,
    geometry: Geometry,
    /// `ListChangedBlocks from A to B`, for messages.
    ctx: String,
    /// The token of the next page (`None` before the first page and after the last).
    page_token: Option<String>,
    /// No page left to fetch.
    done: bool,
    /// The last changed block index seen, for the ordering check across pages.
    last_index: Option<u64>,
    /// Pages in a row that listed nothing.
    empty_pages: u32,
    /// Extents of the last page not handed out yet.
    pending: VecDeque<Extent>,
}

impl EbsChanges {
    /// The changes from snapshot `first` to `second` (the opened snapshot, of `geometry`).
    #[must_use]
    pub fn new(client: Client, first: String, second: String, geometry: Geometry) -> Self {
        Self {
            ctx: format!("ListChangedBlocks from {first} to {second}"),
            client,
            first,
            second,
            geometry,
            page_token: None,
            done: false,
            last_index: None,
            empty_pages: 0,
            pending: VecDeque::new(),
        }
    }

    /// Fetch and validate the next page, then queue its extents. Nothing changes on error.
    fn fetch_page(&mut self) -> Result<(), Error> {
        let ctx = &self.ctx;
        let url = self.client.list_changed_blocks_url(
            &self.first,
            &self.second,
            self.page_token.as_deref(),
        );
        let response = api::get(ctx, url)?;
        api::check_status(ctx, &response)?;
        let page = api::parse_changed_blocks(ctx, &response.body)?;
        self.geometry
            .check_same(ctx, page.block_size, page.volume_gib)?;
        api::check_indices(
            ctx,
            page.entries.iter().copied(),
            self.last_index,
            self.geometry.blocks(),
        )?;
        let mut empty_pages = 0;
        if let Some(next) = &page.next_token {
            if self.page_token.as_ref() == Some(next) {
                return Err(Error::invalid(format!(
                    "{ctx}: NextToken repeats the page token just sent (the listing does not advance)"
                )));
            }
            if page.entries.is_empty() {
                empty_pages = self.empty_pages + 1;
                if empty_pages > MAX_EMPTY_PAGES {
                    return Err(Error::invalid(format!(
                        "{ctx}: {empty_pages} pages in a row list no block (the listing does not advance)"
                    )));
                }
            }
        }
        let bs = self.geometry.block_size;
        for &index in &page.entries {
            let e = Extent::data(index * bs, bs);
            match self.pending.back_mut() {
                Some(last) if last.end() == e.offset => last.length += bs,
                _ => self.pending.push_back(e),
            }
        }
        self.last_index = page.entries.last().copied().or(self.last_index);
        self.empty_pages = empty_pages;
        self.done = page.next_token.is_none();
        self.page_token = page.next_token;
        Ok(())
    }
}

impl ChangeSet for EbsChanges {
    fn next(&mut self, max: usize) -> Result<Option<Vec<Extent>>, Error> {
        if self.pending.is_empty() {
            if self.done {
                return Ok(None);
            }
            self.fetch_page()?;
            if self.pending.is_empty() {
                return Ok(if self.done { None } else { Some(Vec::new()) });
            }
        }
        let n = max.max(1).min(self.pending.len());
        Ok(Some(self.pending.drain(..n).collect()))
    }
}
