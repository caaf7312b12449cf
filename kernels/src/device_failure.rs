//! Device failures inside [`Backend`](crate::Backend) ops. The trait is infallible (the CPU
//! cannot fail), so a GPU backend whose device fails — out of memory, a driver error — panics
//! with a [`DeviceFailure`] as the payload. [`catch_device_failure`] turns that panic back into
//! a value at the edge of a training run, so the caller can report it as an error (and tell an
//! out-of-memory, which a restart would only repeat, from a transient fault); any other panic,
//! a bug, keeps unwinding.
//!
//! While nobody catches them, failures are printed by a panic hook this module chains in front
//! of the previous one (the default hook prints only string payloads); inside
//! [`catch_device_failure`] the catcher reports them instead, so they are not printed twice.

use std::cell::Cell;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// A device op that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFailure {
    /// The backend op that failed.
    pub op: String,
    /// The device's error.
    pub message: String,
    /// The device ran out of memory: the same work on the same device fails again.
    pub out_of_memory: bool,
    /// A fault a fresh process may not meet again (a driver or collective error); everything
    /// else — out of memory, a shape or setting refused, a kernel that does not compile —
    /// would fail the same way after a restart.
    pub transient: bool,
}

impl fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for DeviceFailure {}

thread_local! {
    /// How many [`catch_device_failure`] calls this thread is inside.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

static HOOK: Once = Once::new();

impl DeviceFailure {
    /// Unwinds with `self` as the panic payload (located at the caller, or at its caller
    /// where that is `#[track_caller]` too).
    #[track_caller]
    pub fn raise(self) -> ! {
        install_hook();
        panic::panic_any(self)
    }
}

/// Chains a hook that prints a [`DeviceFailure`] nobody catches (or stays silent for one that
/// a [`catch_device_failure`] on this thread will report) and leaves every other panic to the
/// hook that was there before. Called before any failure can be raised (a GPU backend's
/// creation, a catch), since a hook cannot be set from a thread that is already panicking.
pub(crate) fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            match info.payload().downcast_ref::<DeviceFailure>() {
                Some(_) if CATCHING.with(Cell::get) > 0 => {}
                Some(failure) => {
                    let thread = std::thread::current();
                    let location = info
                        .location()
                        .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
                    eprintln!(
                        "thread '{}' panicked{location}:\n{failure}",
                        thread.name().unwrap_or("<unnamed>")
                    );
                }
                None => previous(info),
            }
        }));
    });
}

/// Runs `work`; a [`DeviceFailure`] raised on this thread inside it comes back as `Err`. Other
/// panics unwind on.
pub fn catch_device_failure<T>(work: impl FnOnce() -> T) -> Result<T, DeviceFailure> {
    install_hook();
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            CATCHING.with(|c| c.set(c.get() - 1));
        }
    }
    CATCHING.with(|c| c.set(c.get() + 1));
    let depth = Depth;
    // Unwind safety: on a failure, whatever `work` left half-done is dropped by the caller,
    // which only reports the error.
    let outcome = panic::catch_unwind(AssertUnwindSafe(work));
    drop(depth);
    outcome.map_err(|payload| match payload.downcast::<DeviceFailure>() {
        Ok(failure) => *failure,
        Err(other) => panic::resume_unwind(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(out_of_memory: bool) -> DeviceFailure {
        DeviceFailure {
            op: "linear_forward".into(),
            message: "no memory".into(),
            out_of_memory,
            transient: false,
        }
    }

    #[test]
    fn a_raised_failure_comes_back_as_the_error() {
        let caught = catch_device_failure(|| -> u32 { failure(true).raise() });
        assert_eq!(caught, Err(failure(true)));
        assert_eq!(catch_device_failure(|| 7), Ok(7));
        assert_eq!(failure(false).to_string(), "linear_forward: no memory");
    }

    #[test]
    fn other_panics_unwind_through() {
        let outer = panic::catch_unwind(|| catch_device_failure(|| panic!("a bug")));
        let payload = outer.expect_err("the bug's panic must not be caught as a failure");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"a bug"));
        // The depth counter came back down, so later failures outside a catch are printed.
        assert_eq!(CATCHING.with(Cell::get), 0);
    }

    #[test]
    fn nested_catches_each_see_their_own_failure() {
        let outer = catch_device_failure(|| {
            let inner = catch_device_failure(|| -> () { failure(false).raise() });
            assert_eq!(inner, Err(failure(false)));
            failure(true).raise()
        });
        assert_eq!(outer, Err(failure(true)));
    }
}
