//! A real recovery point for the tests: a memory vault holding one disk with data, a hole, a
//! short tail, read through a real [`ferry_store::PointReader`].

use std::path::Path;
use std::sync::Arc;

use ferry_store::{
    Backend, ImportOptions, InitOptions, OpenOptions, PointReader, PointSelector, ReaderOptions,
    Secret, Vault,
};

/// Chunk size of the test vault.
pub const CS: u64 = 64 << 10;

/// The image's bytes: 40 chunks and a 1000-byte tail; noise, a hole, repeated bytes.
pub fn image() -> Vec<u8> {
    let size = (40 * CS + 1000) as usize;
    let mut img = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut img[..5 * CS as usize] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    // Chunks 5..20: a hole.
    img[20 * CS as usize..30 * CS as usize].fill(0x5a);
    for (i, b) in img[size - 1000..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    img
}

/// Imports [`image`] as item `web` into a memory vault and opens a reader of it.
pub async fn reader(dir: &Path) -> (PointReader, Vec<u8>) {
    let v = Vault::init(
        Backend::open("memory://", &Vec::new(), false).unwrap(),
        &Secret::KeyFile(vec![4; 32]),
        InitOptions {
            chunk_size: CS as u32,
            ..InitOptions::default()
        },
        OpenOptions::new(dir.join("cache")),
    )
    .await
    .unwrap();
    let img = image();
    let path = dir.join("disk.img");
    std::fs::write(&path, &img).unwrap();
    v.import(ImportOptions::full("web", &path), Arc::default())
        .await
        .unwrap();
    let r = v
        .open_reader(
            "web",
            &PointSelector::Latest,
            None,
            ReaderOptions::default(),
        )
        .await
        .unwrap();
    (r, img)
}
