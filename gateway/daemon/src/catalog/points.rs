//! The catalog's mirror of the recovery points in the vaults.
//!
//! The vault is the source of truth for points (a point exists when its sealed record does);
//! the catalog keeps a summary of each (table `points`, key `<vault>/<item>/<point id>`), so
//! that an item's newest point, its age against the policy's RPO threshold, and point counts
//! are answered without listing the bucket. `crate::mirror` brings the table in step with the
//! vaults at start and then periodically: new points are added, points gone from the vault
//! (retention) are removed. The mirror is never exported in snapshots: a restored appliance
//! rebuilds it from the vault.
//!
//! Bounds: at most [`MAX_POINTS`] summaries (beyond, the oldest are not mirrored and the
//! mirror says so in its log).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::record::{parse, to_vec, version};
use super::{Catalog, RECORD_VERSION, Result};

pub(super) const POINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("points");

/// Point summaries kept.
pub const MAX_POINTS: usize = 1_000_000;

/// What the catalog knows of one recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointSummary {
    /// The vault holding it.
    pub vault: String,
    /// Its protected item.
    pub item: String,
    /// Point id (sorts by time).
    pub id: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// `crash` or `app`.
    pub consistency: String,
    /// Disks in it.
    pub disks: u32,
    /// Sum of the disks' sizes, bytes.
    pub size_bytes: u64,
}

impl PointSummary {
    /// Its key in `points`.
    pub fn key(&self) -> String {
        point_key(&self.vault, &self.item, &self.id)
    }
}

/// The key of a point: `<vault>/<item>/<id>` (none of the three may hold `/`).
pub fn point_key(vault: &str, item: &str, id: &str) -> String {
    format!("{vault}/{item}/{id}")
}

/// An item's points as the mirror knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemPoints {
    /// How many.
    pub count: u64,
    /// The newest: (id, created).
    pub latest: Option<(String, u64)>,
}

impl ItemPoints {
    /// Counts `p`, keeping the newest.
    fn add(&mut self, p: PointSummary) {
        self.count += 1;
        if self.latest.as_ref().is_none_or(|(_, t)| p.created_ms >= *t) {
            self.latest = Some((p.id, p.created_ms));
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointV1 {
    v: u8,
    vault: String,
    item: String,
    id: String,
    created_ms: u64,
    consistency: String,
    disks: u32,
    size_bytes: u64,
}

/// Encodes a point summary.
pub fn encode_point(p: &PointSummary) -> Vec<u8> {
    to_vec(&PointV1 {
        v: RECORD_VERSION,
        vault: p.vault.clone(),
        item: p.item.clone(),
        id: p.id.clone(),
        created_ms: p.created_ms,
        consistency: p.consistency.clone(),
        disks: p.disks,
        size_bytes: p.size_bytes,
    })
}

/// Decodes a point summary stored under `key`.
pub fn decode_point(key: &str, b: &[u8]) -> Result<PointSummary> {
    const T: &str = "points";
    version(T, key, b)?;
    let r: PointV1 = parse(T, key, b)?;
    if point_key(&r.vault, &r.item, &r.id) != key {
        return Err(super::CatalogError::BadRecord {
            table: T,
            key: key.to_string(),
            reason: "the record's vault/item/id is not its key".into(),
        });
    }
    Ok(PointSummary {
        vault: r.vault,
        item: r.item,
        id: r.id,
        created_ms: r.created_ms,
        consistency: r.consistency,
        disks: r.disks,
        size_bytes: r.size_bytes,
    })
}

/// The range of keys of vault `vault`.
fn vault_range(vault: &str) -> (String, String) {
    // `/` + 1 is `0`: every `<vault>/…` key sorts between the two.
    (format!("{vault}/"), format!("{vault}0"))
}

impl Catalog {
    /// The keys of vault `vault`'s mirrored points.
    pub fn mirrored_point_keys(&self, vault: &str) -> Result<BTreeSet<String>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(POINTS).map_err(|e| self.err(e))?;
        let (lo, hi) = vault_range(vault);
        let mut out = BTreeSet::new();
        for e in t
            .range::<&str>((Bound::Included(lo.as_str()), Bound::Excluded(hi.as_str())))
            .map_err(|e| self.err(e))?
        {
            let (k, _) = e.map_err(|e| self.err(e))?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }

    /// Adds `add` and removes the keys `remove` from the mirror, in one transaction.
    pub fn apply_point_mirror(&self, add: &[PointSummary], remove: &[String]) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = w.open_table(POINTS).map_err(|e| self.err(e))?;
            for k in remove {
                t.remove(k.as_str()).map_err(|e| self.err(e))?;
            }
            for p in add {
                t.insert(p.key().as_str(), &encode_point(p)[..])
                    .map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Item `item`'s points in vault `vault`.
    pub fn item_points(&self, vault: &str, item: &str) -> Result<ItemPoints> {
        let mut v = self.items_points(&[(vault, item)])?;
        Ok(v.pop().unwrap_or_default())
    }

    /// The points of each (vault, item) of `items`, in order, in one read transaction (a
    /// page of items costs one transaction, not one each).
    pub fn items_points(&self, items: &[(&str, &str)]) -> Result<Vec<ItemPoints>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(POINTS).map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(items.len());
        for (vault, item) in items {
            let lo = format!("{vault}/{item}/");
            let hi = format!("{vault}/{item}0");
            let mut ip = ItemPoints::default();
            for e in t
                .range::<&str>((Bound::Included(lo.as_str()), Bound::Excluded(hi.as_str())))
                .map_err(|e| self.err(e))?
            {
                let (k, v) = e.map_err(|e| self.err(e))?;
                ip.add(decode_point(k.value(), v.value())?);
            }
            out.push(ip);
        }
        Ok(out)
    }

    /// Every item's points, by (vault, item), for the metrics.
    pub fn all_item_points(&self) -> Result<BTreeMap<(String, String), ItemPoints>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(POINTS).map_err(|e| self.err(e))?;
        let mut out: BTreeMap<(String, String), ItemPoints> = BTreeMap::new();
        for e in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = e.map_err(|e| self.err(e))?;
            let p = decode_point(k.value(), v.value())?;
            out.entry((p.vault.clone(), p.item.clone()))
                .or_default()
                .add(p);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalog-v1");

    fn v1_point() -> PointSummary {
        PointSummary {
            vault: "default".into(),
            item: "web-01".into(),
            id: "20261126T190000.000Z-a1b2c3d4".into(),
            created_ms: 1_795_719_600_000,
            consistency: "crash".into(),
            disks: 1,
            size_bytes: 1 << 30,
        }
    }

    /// `cargo test -p ferry-daemon -- --ignored write_v1_point_fixture` (an existing file is
    /// frozen).
    #[test]
    #[ignore = "writes the committed fixture"]
    fn write_v1_point_fixture() {
        let p = std::path::Path::new(FIXTURES).join("point.json");
        if !p.exists() {
            std::fs::write(p, encode_point(&v1_point())).unwrap();
        }
    }

    #[test]
    fn v1_point_decodes_and_the_mirror_answers_per_item() {
        let b = std::fs::read(std::path::Path::new(FIXTURES).join("point.json")).unwrap();
        let p = v1_point();
        assert_eq!(decode_point(&p.key(), &b).unwrap(), p);
        assert_eq!(encode_point(&p), b);
        assert!(decode_point("default/web-02/x", &b).is_err());

        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        let mk = |vault: &str, item: &str, id: &str, t: u64| PointSummary {
            vault: vault.into(),
            item: item.into(),
            id: id.into(),
            created_ms: t,
            ..v1_point()
        };
        let pts = [
            mk("default", "web-01", "a", 10),
            mk("default", "web-01", "b", 20),
            mk("default", "web-010", "c", 30),
            mk("default0", "web-01", "d", 40),
        ];
        c.apply_point_mirror(&pts, &[]).unwrap();
        let ip = c.item_points("default", "web-01").unwrap();
        assert_eq!(ip.count, 2, "web-010 and vault default0 are not web-01's");
        assert_eq!(ip.latest, Some(("b".into(), 20)));
        assert_eq!(c.mirrored_point_keys("default").unwrap().len(), 3);
        c.apply_point_mirror(&[], &[pts[1].key()]).unwrap();
        assert_eq!(
            c.item_points("default", "web-01").unwrap().latest,
            Some(("a".into(), 10))
        );
        assert_eq!(c.all_item_points().unwrap().len(), 3);
    }
}
