//! Failover hooks: plugins that run as a pre or post step of a recovery plan.
//!
//! The host calls [`FailoverHook::run`] with the plan's [`Context`] (which operation, which
//! phase, which machines); the hook does its work through the `http` and `kv` capabilities
//! ([`crate::http`], [`crate::kv`]) and answers with an [`Outcome`]. Export it with
//! [`crate::export_failover_hook!`].

use std::fmt;

/// Which operation of a recovery plan is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A test failover into an isolated network.
    TestFailover,
    /// Tearing a test failover down.
    TestFailoverCleanup,
    /// A planned failover (the source is shut down cleanly first).
    PlannedFailover,
    /// An unplanned failover (the source is gone).
    UnplannedFailover,
    /// Making a failover permanent.
    Commit,
    /// Protecting the failed-over machines in the other direction.
    Reprotect,
    /// Returning to the original site.
    Failback,
}

impl Operation {
    /// The WIT name, in kebab case: `test-failover`, `planned-failover`, ...
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TestFailover => "test-failover",
            Self::TestFailoverCleanup => "test-failover-cleanup",
            Self::PlannedFailover => "planned-failover",
            Self::UnplannedFailover => "unplanned-failover",
            Self::Commit => "commit",
            Self::Reprotect => "reprotect",
            Self::Failback => "failback",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Before or after the plan's group of machines is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before: an [`Outcome::Abort`] stops the plan.
    Pre,
    /// After: the plan has acted; an abort marks the step failed.
    Post,
}

impl Phase {
    /// The WIT name: `pre` or `post`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pre => "pre",
            Self::Post => "post",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One machine in the plan's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Machine name.
    pub name: String,
    /// The recovery point used (empty when the operation uses none).
    pub recovery_point: String,
}

/// What the host tells a hook about the running plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Recovery plan name.
    pub plan: String,
    /// Unique id of this run of the plan (the scope of [`crate::kv`]).
    pub run_id: String,
    /// The operation running.
    pub operation: Operation,
    /// Before or after the group is processed.
    pub phase: Phase,
    /// Name of the plan step this hook is attached to.
    pub step: String,
    /// The machines of the group.
    pub items: Vec<Item>,
    /// Step parameters from the plan, in plan order.
    pub parameters: Vec<(String, String)>,
}

impl Context {
    /// The step parameter `key` (the last one when the plan repeats it).
    #[must_use]
    pub fn parameter(&self, key: &str) -> Option<&str> {
        self.parameters
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What a hook answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Carry on.
    Proceed,
    /// This step did nothing on purpose; carry on. The message says why.
    Skip(String),
    /// Stop the plan. Honoured in the `pre` phase; in `post` the plan has already acted, so the
    /// host records the step as failed and carries on.
    Abort(String),
}

impl Outcome {
    /// [`Outcome::Skip`] with `message`.
    pub fn skip(message: impl Into<String>) -> Self {
        Self::Skip(message.into())
    }

    /// [`Outcome::Abort`] with `message`.
    pub fn abort(message: impl Into<String>) -> Self {
        Self::Abort(message.into())
    }
}

/// A pre/post step of a recovery plan. Like the WIT world, it is stateless between runs: keep
/// what a post phase needs from its pre phase in [`crate::kv`].
pub trait FailoverHook: 'static {
    /// Do the step's work for `context` and say how the plan should go on. A panic traps and
    /// the host treats the step as failed.
    fn run(context: &Context) -> Outcome;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kebab_case() {
        assert_eq!(
            Operation::TestFailoverCleanup.to_string(),
            "test-failover-cleanup"
        );
        assert_eq!(Operation::UnplannedFailover.as_str(), "unplanned-failover");
        assert_eq!(Phase::Post.to_string(), "post");
    }

    #[test]
    fn last_parameter_wins() {
        let ctx = Context {
            plan: "p".into(),
            run_id: "r".into(),
            operation: Operation::Commit,
            phase: Phase::Pre,
            step: "s".into(),
            items: vec![],
            parameters: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        };
        assert_eq!(ctx.parameter("a"), Some("2"));
        assert_eq!(ctx.parameter("b"), None);
    }
}
