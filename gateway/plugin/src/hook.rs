//! Running a failover hook: one fresh instance per step run, the plan run's `kv` passed in.
//!
//! What the outcome means is decided here, not by the plugin: `abort` vetoes only in a `pre`
//! phase; in `post` the plan has already acted, so it is reported as a failed step instead.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::bindings::hook::exports::ferry::plugin::hook as wit;
use crate::error::PluginError;
use crate::host::{LoadedPlugin, PluginHost, Pre, arm, classify};
use crate::manifest::World;
use crate::state::PlanKv;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    TestFailover,
    TestFailoverCleanup,
    PlannedFailover,
    UnplannedFailover,
    Commit,
    Reprotect,
    Failback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Pre,
    Post,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookItem {
    pub name: String,
    #[serde(default)]
    pub recovery_point: String,
}

/// The context a hook runs in (also the JSON `ferry plugin run-hook --context` takes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookContext {
    pub plan: String,
    pub run_id: String,
    pub operation: Operation,
    pub phase: Phase,
    #[serde(default)]
    pub step: String,
    #[serde(default)]
    pub items: Vec<HookItem>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// What the hook answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "message", rename_all = "kebab-case")]
pub enum HookOutcome {
    Proceed,
    Skip(String),
    Abort(String),
}

impl HookOutcome {
    /// Does this outcome stop the plan in `phase`? (`abort` vetoes only before acting.)
    pub fn vetoes(&self, phase: Phase) -> bool {
        matches!(self, HookOutcome::Abort(_)) && phase == Phase::Pre
    }
}

const MAX_MESSAGE: usize = 4096;

fn short(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl PluginHost {
    /// Run a hook once, in a fresh instance. `kv` is the plan run's state.
    pub async fn run_hook(
        &self,
        plugin: &LoadedPlugin,
        ctx: &HookContext,
        kv: &PlanKv,
    ) -> Result<HookOutcome, PluginError> {
        let Pre::Hook(pre) = &plugin.inner.pre else {
            return Err(PluginError::WrongWorld {
                plugin: plugin.name().into(),
                expected: World::FailoverHook.as_str(),
                found: World::SourceAdapter.to_string(),
                exports: plugin.summary().exports.join(", "),
            });
        };
        let mut store = self.new_store(plugin, Some(kv.clone()));
        let limit = plugin.inner.limits.deadline() + std::time::Duration::from_millis(250);
        let deadline_err = |plugin: &LoadedPlugin, call| PluginError::Deadline {
            plugin: plugin.name().into(),
            call,
            limit_ms: plugin.inner.limits.deadline_ms,
        };

        arm(&mut store, self.config.fuel);
        let bindings = match tokio::time::timeout(limit, pre.instantiate_async(&mut store)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return Err(classify(
                    &store,
                    "instantiate",
                    self.config.max_wasm_stack,
                    e,
                ));
            }
            Err(_) => return Err(deadline_err(plugin, "instantiate")),
        };

        let wctx = wit::Context {
            plan: ctx.plan.clone(),
            run_id: ctx.run_id.clone(),
            operation: match ctx.operation {
                Operation::TestFailover => wit::Operation::TestFailover,
                Operation::TestFailoverCleanup => wit::Operation::TestFailoverCleanup,
                Operation::PlannedFailover => wit::Operation::PlannedFailover,
                Operation::UnplannedFailover => wit::Operation::UnplannedFailover,
                Operation::Commit => wit::Operation::Commit,
                Operation::Reprotect => wit::Operation::Reprotect,
                Operation::Failback => wit::Operation::Failback,
            },
            phase: match ctx.phase {
                Phase::Pre => wit::Phase::Pre,
                Phase::Post => wit::Phase::Post,
            },
            step: ctx.step.clone(),
            items: ctx
                .items
                .iter()
                .map(|i| wit::Item {
                    name: i.name.clone(),
                    recovery_point: i.recovery_point.clone(),
                })
                .collect(),
            parameters: ctx
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        arm(&mut store, self.config.fuel);
        let r = tokio::time::timeout(
            limit,
            bindings.ferry_plugin_hook().call_run(&mut store, &wctx),
        )
        .await;
        match r {
            Ok(Ok(wit::Outcome::Proceed)) => Ok(HookOutcome::Proceed),
            Ok(Ok(wit::Outcome::Skip(m))) => Ok(HookOutcome::Skip(short(m))),
            Ok(Ok(wit::Outcome::Abort(m))) => Ok(HookOutcome::Abort(short(m))),
            Ok(Err(e)) => Err(classify(&store, "run", self.config.max_wasm_stack, e)),
            Err(_) => Err(deadline_err(plugin, "run")),
        }
    }
}
