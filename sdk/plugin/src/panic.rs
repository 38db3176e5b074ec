//! Panic messages that reach the operator.
//!
//! Plugins are built with `panic = "abort"`: a panic is a trap, and the host reports the trap.
//! The trap alone says nothing about why, and a component has no stderr for the default panic
//! message. The export glue therefore installs, on the first call into the plugin, a panic hook
//! that sends the message and location through the `log` capability (at `error`) before the
//! trap.

use std::sync::Once;

/// Install the logging panic hook (once; later calls do nothing). The export macros call this
/// at the start of every exported function; call it yourself only in code that runs before.
pub fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload_as_str()
                .unwrap_or("(a panic payload that is not a string)");
            let line = match info.location() {
                Some(at) => format!("plugin panicked at {}:{}: {message}", at.file(), at.line()),
                None => format!("plugin panicked: {message}"),
            };
            crate::log::error(&line);
        }));
    });
}
