//! The glue between a plugin's traits and the generated export traits.
//!
//! `export_source_adapter!(MyAdapter)` names `AdapterExport<MyAdapter>` as the type implementing
//! the generated `Guest` trait and hands it to the generated `export!` macro, which emits the
//! component's exported functions. The glue types below implement the generated traits
//! generically by delegating to the plugin's [`crate::adapter::SourceAdapter`] /
//! [`crate::hook::FailoverHook`] impl, converting types on the way, and install the logging
//! panic hook on the first call.

#[cfg(feature = "adapter")]
pub use adapter::{AdapterExport, DiskExport};
#[cfg(feature = "hook")]
pub use hook::HookExport;

#[cfg(feature = "adapter")]
mod adapter {
    use std::fmt;
    use std::marker::PhantomData;

    use std::cell::RefCell;

    use crate::adapter::{ChangeSet, Disk, Reader, SourceAdapter};
    use crate::bindings::adapter::exports::ferry::plugin::adapter as wit;
    use crate::bindings::adapter::ferry::plugin::types as wit_types;

    /// Implements the generated `Guest` for a [`SourceAdapter`].
    pub struct AdapterExport<A>(PhantomData<fn() -> A>);

    impl<A> fmt::Debug for AdapterExport<A> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("AdapterExport")
        }
    }

    /// Implements the generated `GuestDisk` for the [`SourceAdapter::Disk`] of `A`.
    pub struct DiskExport<A: SourceAdapter>(A::Disk);

    impl<A: SourceAdapter> fmt::Debug for DiskExport<A> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("DiskExport")
        }
    }

    /// Implements the generated `GuestChangeSet` over a boxed [`ChangeSet`].
    pub struct ChangeSetExport(RefCell<Box<dyn ChangeSet>>);

    impl fmt::Debug for ChangeSetExport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("ChangeSetExport")
        }
    }

    impl wit::GuestChangeSet for ChangeSetExport {
        fn next(&self, max: u32) -> Result<Option<Vec<wit_types::Extent>>, wit::Error> {
            crate::panic::install_hook();
            let mut set = self.0.borrow_mut();
            set.next(max as usize)
                .map(|batch| batch.map(extents_out))
                .map_err(Into::into)
        }
    }

    impl<A: SourceAdapter> wit::Guest for AdapterExport<A> {
        type Disk = DiskExport<A>;
        type ChangeSet = ChangeSetExport;

        fn info() -> wit::PluginInfo {
            crate::panic::install_hook();
            A::info().into()
        }

        fn probe(header: Vec<u8>) -> bool {
            crate::panic::install_hook();
            A::probe(&header)
        }
    }

    fn extents_out(extents: Vec<crate::io::Extent>) -> Vec<wit_types::Extent> {
        // Same layout on both sides: `collect` reuses the allocation.
        extents.into_iter().map(Into::into).collect()
    }

    impl<A: SourceAdapter> wit::GuestDisk for DiskExport<A> {
        fn open(reader: wit::Reader) -> Result<wit::Disk, wit::Error> {
            crate::panic::install_hook();
            A::open(Reader::from_host(reader))
                .map(|disk| wit::Disk::new(Self(disk)))
                .map_err(Into::into)
        }

        fn info(&self) -> wit::DiskInfo {
            crate::panic::install_hook();
            self.0.info().into()
        }

        fn extents(&self, offset: u64, length: u64) -> Result<Vec<wit_types::Extent>, wit::Error> {
            crate::panic::install_hook();
            self.0
                .extents(offset, length)
                .map(extents_out)
                .map_err(Into::into)
        }

        fn locate(&self, offset: u64, length: u64) -> Result<Vec<wit::Mapping>, wit::Error> {
            crate::panic::install_hook();
            self.0
                .locate(offset, length)
                .map(|list| list.into_iter().map(Into::into).collect())
                .map_err(Into::into)
        }

        fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, wit::Error> {
            crate::panic::install_hook();
            self.0.read(offset, len).map_err(Into::into)
        }

        fn changes(&self, document: Vec<u8>) -> Result<wit::ChangeSet, wit::Error> {
            crate::panic::install_hook();
            self.0
                .changes(&document)
                .map(|set| wit::ChangeSet::new(ChangeSetExport(RefCell::new(set))))
                .map_err(Into::into)
        }
    }
}

#[cfg(feature = "hook")]
mod hook {
    use std::fmt;
    use std::marker::PhantomData;

    use crate::bindings::hook::exports::ferry::plugin::hook as wit;
    use crate::hook::FailoverHook;

    /// Implements the generated `Guest` for a [`FailoverHook`].
    pub struct HookExport<H>(PhantomData<fn() -> H>);

    impl<H> fmt::Debug for HookExport<H> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("HookExport")
        }
    }

    impl<H: FailoverHook> wit::Guest for HookExport<H> {
        fn run(context: wit::Context) -> wit::Outcome {
            crate::panic::install_hook();
            H::run(&context.into()).into()
        }
    }
}

/// Export a [`SourceAdapter`](crate::adapter::SourceAdapter) as the plugin's `adapter`
/// interface. Use it once, in the plugin's crate root, with the `adapter` feature:
///
/// ```ignore
/// struct MyAdapter;
/// impl ferry_plugin_sdk::adapter::SourceAdapter for MyAdapter { /* ... */ }
/// ferry_plugin_sdk::export_source_adapter!(MyAdapter);
/// ```
#[cfg(feature = "adapter")]
#[macro_export]
macro_rules! export_source_adapter {
    ($adapter:ty) => {
        // Natively only the trait bound is checked: the export names (`ferry:plugin/...#...`)
        // are not valid symbol names for a native `cdylib`'s version script.
        const _: () = {
            fn assert_source_adapter<A: $crate::adapter::SourceAdapter>() {}
            let _ = assert_source_adapter::<$adapter>;
        };
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type FerrySourceAdapterExport = $crate::__private::AdapterExport<$adapter>;
            $crate::__private::adapter::export!(
                FerrySourceAdapterExport with_types_in $crate::__private::adapter
            );
        };
    };
}

/// Export a [`FailoverHook`](crate::hook::FailoverHook) as the plugin's `hook` interface. Use
/// it once, in the plugin's crate root, with the `hook` feature:
///
/// ```ignore
/// struct MyHook;
/// impl ferry_plugin_sdk::hook::FailoverHook for MyHook { /* ... */ }
/// ferry_plugin_sdk::export_failover_hook!(MyHook);
/// ```
#[cfg(feature = "hook")]
#[macro_export]
macro_rules! export_failover_hook {
    ($hook:ty) => {
        // Natively only the trait bound is checked (see `export_source_adapter!`).
        const _: () = {
            fn assert_failover_hook<H: $crate::hook::FailoverHook>() {}
            let _ = assert_failover_hook::<$hook>;
        };
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type FerryFailoverHookExport = $crate::__private::HookExport<$hook>;
            $crate::__private::hook::export!(
                FerryFailoverHookExport with_types_in $crate::__private::hook
            );
        };
    };
}
