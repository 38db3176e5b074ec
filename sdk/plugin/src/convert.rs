//! Conversions between the SDK's types and the generated ones, for each enabled world.
//!
//! The two worlds generate separate (identical) copies of the shared `types`, so the shared
//! conversions are written once as a macro and instantiated per world.

use crate::io::{IoError, IoErrorKind};
use crate::log::Level;

macro_rules! shared_conversions {
    ($types:path) => {
        use $types as wit_types;

        impl From<Level> for wit_types::Level {
            fn from(level: Level) -> Self {
                match level {
                    Level::Trace => Self::Trace,
                    Level::Debug => Self::Debug,
                    Level::Info => Self::Info,
                    Level::Warn => Self::Warn,
                    Level::Error => Self::Error,
                }
            }
        }

        impl From<wit_types::IoErrorKind> for IoErrorKind {
            fn from(kind: wit_types::IoErrorKind) -> Self {
                match kind {
                    wit_types::IoErrorKind::OutOfRange => Self::OutOfRange,
                    wit_types::IoErrorKind::Denied => Self::Denied,
                    wit_types::IoErrorKind::Timeout => Self::Timeout,
                    wit_types::IoErrorKind::Io => Self::Io,
                    wit_types::IoErrorKind::NotFound => Self::NotFound,
                }
            }
        }

        impl From<IoErrorKind> for wit_types::IoErrorKind {
            fn from(kind: IoErrorKind) -> Self {
                match kind {
                    IoErrorKind::OutOfRange => Self::OutOfRange,
                    IoErrorKind::Denied => Self::Denied,
                    IoErrorKind::Timeout => Self::Timeout,
                    IoErrorKind::Io => Self::Io,
                    IoErrorKind::NotFound => Self::NotFound,
                }
            }
        }

        impl From<wit_types::IoError> for IoError {
            fn from(e: wit_types::IoError) -> Self {
                Self {
                    kind: e.kind.into(),
                    message: e.message,
                }
            }
        }

        impl From<IoError> for wit_types::IoError {
            fn from(e: IoError) -> Self {
                Self {
                    kind: e.kind.into(),
                    message: e.message,
                }
            }
        }
    };
}

#[cfg(feature = "adapter")]
mod adapter {
    use super::{IoError, IoErrorKind, Level};
    use crate::adapter::{DiskInfo, Error, Location, Mapping, PluginInfo};
    use crate::bindings::adapter::exports::ferry::plugin::adapter as wit;
    use crate::io::{Extent, ExtentKind};

    shared_conversions!(crate::bindings::adapter::ferry::plugin::types);

    impl From<wit_types::ExtentKind> for ExtentKind {
        fn from(kind: wit_types::ExtentKind) -> Self {
            match kind {
                wit_types::ExtentKind::Data => Self::Data,
                wit_types::ExtentKind::Zero => Self::Zero,
                wit_types::ExtentKind::Unallocated => Self::Unallocated,
            }
        }
    }

    impl From<ExtentKind> for wit_types::ExtentKind {
        fn from(kind: ExtentKind) -> Self {
            match kind {
                ExtentKind::Data => Self::Data,
                ExtentKind::Zero => Self::Zero,
                ExtentKind::Unallocated => Self::Unallocated,
            }
        }
    }

    impl From<wit_types::Extent> for Extent {
        fn from(e: wit_types::Extent) -> Self {
            Self::new(e.offset, e.length, e.kind.into())
        }
    }

    impl From<Extent> for wit_types::Extent {
        fn from(e: Extent) -> Self {
            Self {
                offset: e.offset,
                length: e.length,
                kind: e.kind.into(),
            }
        }
    }

    impl From<PluginInfo> for wit::PluginInfo {
        fn from(i: PluginInfo) -> Self {
            Self {
                name: i.name,
                version: i.version,
                formats: i.formats,
                description: i.description,
            }
        }
    }

    impl From<Mapping> for wit::Mapping {
        fn from(m: Mapping) -> Self {
            Self {
                offset: m.offset,
                length: m.length,
                location: match m.location {
                    Location::Source(o) => wit::Location::Source(o),
                    Location::Zero => wit::Location::Zero,
                    Location::Adapter => wit::Location::Adapter,
                    Location::Related { reader, offset } => {
                        wit::Location::Related(wit::RelatedLocation { reader, offset })
                    }
                },
            }
        }
    }

    impl From<DiskInfo> for wit::DiskInfo {
        fn from(i: DiskInfo) -> Self {
            Self {
                format: i.format,
                virtual_size: i.virtual_size,
                logical_sector_size: i.logical_sector_size,
                physical_sector_size: i.physical_sector_size,
                disk_id: i.disk_id,
                parent: i.parent,
            }
        }
    }

    impl From<Error> for wit::Error {
        fn from(e: Error) -> Self {
            match e {
                Error::Invalid(m) => Self::Invalid(m),
                Error::Unsupported(m) => Self::Unsupported(m),
                Error::OutOfRange(m) => Self::OutOfRange(m),
                Error::Io(e) => Self::Io(e.into()),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn errors_and_extents_round_trip() {
            let e: wit::Error = Error::Io(IoError::new(IoErrorKind::Timeout, "slow")).into();
            let wit::Error::Io(io) = e else {
                panic!("not io: {e:?}")
            };
            assert_eq!(
                IoError::from(io),
                IoError::new(IoErrorKind::Timeout, "slow")
            );
            let x = Extent::new(1, 2, ExtentKind::Unallocated);
            assert_eq!(Extent::from(wit_types::Extent::from(x)), x);
            assert!(matches!(
                wit::Error::from(Error::out_of_range("m")),
                wit::Error::OutOfRange(m) if m == "m"
            ));
            assert!(matches!(
                wit_types::Level::from(Level::Warn),
                wit_types::Level::Warn
            ));
        }
    }
}

#[cfg(feature = "hook")]
mod hook {
    use super::{IoError, IoErrorKind, Level};
    use crate::bindings::hook::exports::ferry::plugin::hook as wit;
    use crate::hook::{Context, Item, Operation, Outcome, Phase};

    shared_conversions!(crate::bindings::hook::ferry::plugin::types);

    impl From<wit::Operation> for Operation {
        fn from(op: wit::Operation) -> Self {
            match op {
                wit::Operation::TestFailover => Self::TestFailover,
                wit::Operation::TestFailoverCleanup => Self::TestFailoverCleanup,
                wit::Operation::PlannedFailover => Self::PlannedFailover,
                wit::Operation::UnplannedFailover => Self::UnplannedFailover,
                wit::Operation::Commit => Self::Commit,
                wit::Operation::Reprotect => Self::Reprotect,
                wit::Operation::Failback => Self::Failback,
            }
        }
    }

    impl From<wit::Phase> for Phase {
        fn from(phase: wit::Phase) -> Self {
            match phase {
                wit::Phase::Pre => Self::Pre,
                wit::Phase::Post => Self::Post,
            }
        }
    }

    impl From<wit::Context> for Context {
        fn from(c: wit::Context) -> Self {
            Self {
                plan: c.plan,
                run_id: c.run_id,
                operation: c.operation.into(),
                phase: c.phase.into(),
                step: c.step,
                items: c
                    .items
                    .into_iter()
                    .map(|i| Item {
                        name: i.name,
                        recovery_point: i.recovery_point,
                    })
                    .collect(),
                parameters: c.parameters,
            }
        }
    }

    impl From<Outcome> for wit::Outcome {
        fn from(o: Outcome) -> Self {
            match o {
                Outcome::Proceed => Self::Proceed,
                Outcome::Skip(m) => Self::Skip(m),
                Outcome::Abort(m) => Self::Abort(m),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn context_and_outcome_convert() {
            let ctx: Context = wit::Context {
                plan: "plan".into(),
                run_id: "run".into(),
                operation: wit::Operation::TestFailoverCleanup,
                phase: wit::Phase::Post,
                step: "notify".into(),
                items: vec![wit::Item {
                    name: "vm1".into(),
                    recovery_point: "p1".into(),
                }],
                parameters: vec![("k".into(), "v".into())],
            }
            .into();
            assert_eq!(ctx.operation, Operation::TestFailoverCleanup);
            assert_eq!(ctx.phase, Phase::Post);
            assert_eq!(ctx.items[0].recovery_point, "p1");
            assert!(matches!(
                wit::Outcome::from(Outcome::abort("no")),
                wit::Outcome::Abort(m) if m == "no"
            ));
            let e = IoError::from(wit_types::IoError {
                kind: wit_types::IoErrorKind::Denied,
                message: "host not allowed".into(),
            });
            assert_eq!(e.kind, IoErrorKind::Denied);
            assert!(matches!(
                wit_types::Level::from(Level::Info),
                wit_types::Level::Info
            ));
        }
    }
}
