//! The starting point for a new Ferry source adapter: copy this crate, rename it, and replace
//! the format.
//!
//! It reads a deliberately trivial container format, `ferry-template`, so that every part of
//! an adapter is present and small:
//!
//! ```text
//! offset 0    8 bytes   magic "FERRYTPL"
//! offset 8    8 bytes   virtual size, little endian
//! offset 16   496 bytes reserved (zero)
//! offset 512  the virtual disk's bytes (virtual-size of them)
//! ```
//!
//! What to change for a real format: [`probe`](TemplateAdapter::probe) (recognise the magic),
//! [`open`](TemplateAdapter::open) (parse and validate the header, keep what later calls
//! need), [`extents`](Disk::extents) (map the format's allocation), [`read`]
//! (translate virtual offsets to container offsets), [`locate`](Disk::locate) (where
//! bytes are stored, so the host reads plain data itself), and [`changes`](Disk::changes) if the
//! source has change tracking. All parsing goes through [`ReadAt`], so the unit tests below run
//! natively over an in-memory image.
//!
//! [`read`]: TemplateDisk::read

use ferry_plugin_sdk::adapter::{
    Disk, DiskInfo, Error, Location, Mapping, PluginInfo, Reader, SourceAdapter, check_range,
    check_read,
};
use ferry_plugin_sdk::io::{Extent, ReadAt, read_exact_at};

/// The container's magic bytes.
pub const MAGIC: &[u8; 8] = b"FERRYTPL";
/// Size of the header; the virtual disk starts here.
pub const HEADER_LEN: u64 = 512;

/// The adapter (stateless: state lives in [`TemplateDisk`]).
#[derive(Debug)]
pub struct TemplateAdapter;

impl SourceAdapter for TemplateAdapter {
    type Disk = TemplateDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "template".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["ferry-template".to_owned()],
            description: "Example adapter for the toy ferry-template format".to_owned(),
        }
    }

    fn probe(header: &[u8]) -> bool {
        header.starts_with(MAGIC)
    }

    fn open(reader: Reader) -> Result<TemplateDisk, Error> {
        TemplateDisk::open(reader)
    }
}

/// One opened `ferry-template` container.
#[derive(Debug)]
pub struct TemplateDisk {
    reader: Reader,
    virtual_size: u64,
}

impl TemplateDisk {
    /// Parse and validate the header of the container behind `reader`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad magic, a truncated header or a container shorter than the
    /// virtual size it declares.
    pub fn open(reader: Reader) -> Result<Self, Error> {
        let name = reader.name();
        if reader.size() < HEADER_LEN {
            return Err(Error::invalid(format!(
                "{name}: {} bytes is shorter than the {HEADER_LEN}-byte header",
                reader.size()
            )));
        }
        let header = read_exact_at(&reader, 0, 16)?;
        if &header[..8] != MAGIC {
            return Err(Error::invalid(format!(
                "{name}: bad magic (not ferry-template)"
            )));
        }
        let virtual_size = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let available = reader.size() - HEADER_LEN;
        if virtual_size > available {
            return Err(Error::invalid(format!(
                "{name}: header says {virtual_size} bytes of disk, the container holds {available}"
            )));
        }
        Ok(Self {
            reader,
            virtual_size,
        })
    }
}

impl Disk for TemplateDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: "ferry-template".to_owned(),
            virtual_size: self.virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            disk_id: None,
            parent: None,
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = check_range(self.virtual_size, offset, length)?;
        // The whole disk is data. A real format maps its allocation here: extents in order,
        // without gaps, at most `adapter::MAX_EXTENTS` per call (the caller asks again from the end of
        // the last one).
        Ok(if end > offset {
            vec![Extent::data(offset, end - offset)]
        } else {
            Vec::new()
        })
    }

    /// The data path: the virtual bytes are stored as is after the header, so the host reads
    /// them itself. A format with compressed or scattered data answers `Location::Adapter` for
    /// what only `read` can produce, `Location::Zero` for holes.
    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        check_range(self.virtual_size, offset, length)?;
        Ok(vec![Mapping {
            offset,
            length,
            location: Location::Source(HEADER_LEN + offset),
        }])
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        check_read(self.virtual_size, offset, len)?;
        // Virtual offset -> container offset; read_exact_at splits at the host's read cap.
        Ok(read_exact_at(
            &self.reader,
            HEADER_LEN + offset,
            len as usize,
        )?)
    }
}

ferry_plugin_sdk::export_source_adapter!(TemplateAdapter);

#[cfg(test)]
mod tests {
    use super::*;

    fn image(disk: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; usize::try_from(HEADER_LEN).unwrap()];
        img[..8].copy_from_slice(MAGIC);
        img[8..16].copy_from_slice(&(disk.len() as u64).to_le_bytes());
        img.extend_from_slice(disk);
        img
    }

    #[test]
    fn reads_what_was_written() {
        let disk: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let img = image(&disk);
        assert!(TemplateAdapter::probe(&img[..64]));
        let d = TemplateAdapter::open(Reader::new(img)).unwrap();
        assert_eq!(d.info().virtual_size, 10_000);
        assert_eq!(d.read(100, 50).unwrap(), disk[100..150]);
        assert_eq!(d.extents(0, 10_000).unwrap(), vec![Extent::data(0, 10_000)]);
        assert!(matches!(d.read(9_990, 11), Err(Error::OutOfRange(_))));
        assert!(matches!(d.changes(b""), Err(Error::Unsupported(_))));
        let m = d.locate(100, 50).unwrap();
        assert_eq!(m[0].location, Location::Source(HEADER_LEN + 100));
        assert!(d.locate(9_990, 11).is_err());
    }

    #[test]
    fn rejects_bad_containers() {
        assert!(!TemplateAdapter::probe(b"QFI\xfb"));
        let mut img = image(&[1, 2, 3]);
        img[8] = 200;
        let e = TemplateAdapter::open(Reader::new(img)).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("the container holds 3")),
            "{e}"
        );
        let e = TemplateAdapter::open(Reader::new(b"FERRYTPL".to_vec())).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)));
        let mut img = image(&[]);
        img[0] = b'X';
        assert!(TemplateAdapter::open(Reader::new(img)).is_err());
    }
}
