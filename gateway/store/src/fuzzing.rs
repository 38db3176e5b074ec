//! Entry points for fuzzing every parser of untrusted bytes.
//!
//! Everything the vault reads from a bucket or from the operator is attacker-controlled: the
//! `config` JSON, pack footers and trailers, sealed objects, index segments, point records,
//! tree pages and change lists. Each function here feeds arbitrary bytes to one parser; the
//! only acceptable outcomes are `Ok` or a typed error — never a panic, a hang or an allocation
//! out of proportion to the input. The cargo-fuzz targets in `fuzz/` call these, and
//! `tests::smoke` runs them on mutated valid inputs in every `cargo test`.

use crate::crypto::MasterKeys;
use crate::pack::{BlobKind, FOOTER_LEN, PackId};

/// Fixed keys, so that fuzzers can reach code past authentication with inputs built by
/// [`seeds`].
pub fn fuzz_keys() -> MasterKeys {
    MasterKeys::from_plain(&[7u8; 64]).expect("64 bytes")
}

/// The vault `config` object.
pub fn config(data: &[u8]) {
    if let Ok(c) = crate::config::VaultConfig::parse(data) {
        let _ = c.to_bytes();
    }
}

/// A `DiskChangeInfo` document against a 1 GiB disk.
pub fn changes(data: &[u8]) {
    let _ = crate::changes::parse_changes(data, 1 << 30);
}

/// A pack: footer, then trailer (decrypted with the fuzz keys).
pub fn pack(data: &[u8]) {
    if data.len() < FOOTER_LEN {
        return;
    }
    let Ok(f) = crate::pack::parse_footer(&data[data.len() - FOOTER_LEN..]) else {
        return;
    };
    let t_end = data.len() - FOOTER_LEN;
    let Some(t_start) = t_end.checked_sub(f.trailer_len as usize) else {
        return;
    };
    let mut t = data[t_start..t_end].to_vec();
    let _ = crate::pack::open_trailer(&fuzz_keys(), &PackId([1; 16]), &f, t_start as u64, &mut t);
}

/// A sealed object, then its body as a segment and as a point record.
pub fn sealed(data: &[u8]) {
    let k = fuzz_keys();
    if let Ok(body) = crate::sealed::open(&k, crate::sealed::SEGMENT_MAGIC, "index/x", data) {
        let _ = crate::index::decode_segment(&body);
    }
    if let Ok(body) = crate::sealed::open(&k, crate::sealed::POINT_MAGIC, "points/a/b", data) {
        let _ = crate::point::PointRecord::decode("points/a/b", &body);
    }
}

/// Plain (decrypted) bodies: segment, point record, tree page.
pub fn bodies(data: &[u8]) {
    let _ = crate::index::decode_segment(data);
    let _ = crate::point::PointRecord::decode("points/a/b", data);
    for level in 0..3 {
        let _ = crate::tree::decode_page(&crate::ChunkId::ZERO, level, data);
    }
}

/// Valid inputs to start from, one list per entry point (for corpora and the smoke test).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let k = fuzz_keys();
    let mut out = Vec::new();
    let cfg = crate::config::VaultConfig::create(
        &k,
        &crate::crypto::Secret::KeyFile(vec![3; 32]),
        crate::crypto::Argon2Params::default(),
        1 << 16,
        "2026-01-01T00:00:00.000Z".into(),
    )
    .expect("config");
    out.push(("config", cfg.to_bytes()));
    out.push((
        "changes",
        br#"{"startOffset":0,"length":1048576,"changedArea":[{"start":4096,"length":512}]}"#
            .to_vec(),
    ));
    let mut comp = crate::pack::Compressor::new(1);
    let mut p = crate::pack::PackBuilder::new(&k, BlobKind::Data, 1 << 16);
    let blob = vec![5u8; 4096];
    p.add(k.chunk_id(&blob), &blob, &mut comp);
    out.push(("pack", p.finish().bytes.to_vec()));
    let rec = crate::point::PointRecord {
        id: "b".into(),
        item: "a".into(),
        created_ms: 1,
        consistency: crate::point::Consistency::Crash,
        parent: None,
        source: "s".into(),
        disks: vec![],
        tags: vec![("k".into(), "v".into())],
    };
    out.push((
        "sealed",
        crate::sealed::seal(&k, crate::sealed::POINT_MAGIC, "points/a/b", &rec.encode()),
    ));
    out.push(("bodies", rec.encode()));
    out.push((
        "bodies",
        crate::tree::encode_page(0, &vec![crate::ChunkId([1; 32]); crate::tree::FANOUT]),
    ));
    out
}

/// Runs the entry point named `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "config" => config(data),
        "changes" => changes(data),
        "pack" => pack(data),
        "sealed" => sealed(data),
        _ => bodies(data),
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// A bounded, deterministic mutation run of every parser on every seed.
    #[test]
    fn smoke() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xF3);
        for (name, seed) in super::seeds() {
            super::run(name, &seed);
            for _ in 0..2000 {
                let mut d = seed.clone();
                match rng.random_range(0..4) {
                    0 if !d.is_empty() => {
                        let i = rng.random_range(0..d.len());
                        d[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 if !d.is_empty() => d.truncate(rng.random_range(0..d.len())),
                    2 => d.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
                    _ => {
                        for _ in 0..rng.random_range(1..8) {
                            if d.is_empty() {
                                break;
                            }
                            let i = rng.random_range(0..d.len());
                            d[i] = rng.random();
                        }
                    }
                }
                super::run(name, &d);
            }
        }
    }
}
