//! `future`: a minimal raw source adapter built against `ferry:plugin@1.0.0` (a trimmed copy of
//! the WIT in `wit/`), a major version the host does not implement. It exists only so that the
//! host can prove it refuses a plugin of another major version, naming both versions.
//!
//! Its component imports `ferry:plugin/log@1.0.0`, `ferry:plugin/types@1.0.0` and
//! `ferry:plugin/source@1.0.0`, and exports `ferry:plugin/adapter@1.0.0`. The bindings are
//! generated here directly with `wit-bindgen`, not through the SDK (which targets 0.1.0).

#[allow(
    unsafe_code,
    reason = "wit-bindgen's generated canonical-ABI glue; no hand-written unsafe lives here"
)]
#[allow(missing_debug_implementations, reason = "generated code")]
#[allow(
    clippy::all,
    clippy::cast_possible_truncation,
    reason = "generated code"
)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "source-adapter",
    });

    // The export glue is generated code too, so it is expanded here, under the `allow`. Only in
    // the component: the export names are not valid native `cdylib` symbols.
    #[cfg(target_arch = "wasm32")]
    use super::Future;
    #[cfg(target_arch = "wasm32")]
    export!(Future with_types_in self);
}

use bindings::exports::ferry::plugin::adapter::{
    Disk, DiskInfo, Error, Guest, GuestDisk, PluginInfo,
};
use bindings::ferry::plugin::log::log;
use bindings::ferry::plugin::source::Reader;
use bindings::ferry::plugin::types::{Extent, ExtentKind, Level};

/// The adapter.
#[derive(Debug)]
pub struct Future;

/// A raw disk over the host's reader.
#[derive(Debug)]
pub struct FutureDisk {
    reader: Reader,
    size: u64,
}

impl Guest for Future {
    type Disk = FutureDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "future".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["raw".to_owned()],
            description: "Test corpus: built against ferry:plugin@1.0.0".to_owned(),
        }
    }

    fn probe(_header: Vec<u8>) -> bool {
        true
    }
}

impl FutureDisk {
    fn check(&self, offset: u64, length: u64) -> Result<(), Error> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange(format!(
                "range {offset}+{length} is outside the disk of {} bytes",
                self.size
            ))),
        }
    }
}

impl GuestDisk for FutureDisk {
    fn open(reader: Reader) -> Result<Disk, Error> {
        log(Level::Info, "future: open");
        let size = reader.size();
        Ok(Disk::new(Self { reader, size }))
    }

    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: "raw".to_owned(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            disk_id: None,
            parent: None,
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        self.check(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Data,
        }])
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        self.check(offset, u64::from(len))?;
        self.reader.read(offset, len).map_err(Error::Io)
    }

    fn changes(&self, _document: Vec<u8>) -> Result<Vec<Extent>, Error> {
        Err(Error::Unsupported("future: no change tracking".to_owned()))
    }
}
