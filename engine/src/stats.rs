//! Review workload, from the journals: where people are asked, how they answer, and
//! how fast — to spot approval fatigue (many fast, unchanged approvals of one action).

use crate::fold::fold;
use crate::policy::Policy;
use holdpoint_journal::{Decision, GateKind, Principal, Verdict};
use serde::Serialize;
use std::collections::BTreeMap;

/// Decisions faster than this are counted as likely rubber stamps.
pub const FAST_DECISION_SECS: f64 = 2.0;

/// Figures for one action class.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ActionStats {
    pub action: String,
    pub gates: u64,
    pub open: u64,
    pub approved: u64,
    pub edited: u64,
    pub rejected: u64,
    /// Decided by the system at a deadline.
    pub timed_out: u64,
    pub approve_rate: f64,
    pub edit_rate: f64,
    pub reject_rate: f64,
    pub median_secs_to_decide: Option<f64>,
    /// Decisions by a person within [`FAST_DECISION_SECS`].
    pub fast_decisions: u64,
    /// Gates the current policy would not have asked about (it allows their args).
    pub would_auto_approve: u64,
    /// Which rules would have allowed them.
    pub auto_approving_rules: BTreeMap<String, u64>,
}

/// Adds up the gates of these journals. `policy` is the policy in force now, to tell
/// which gates it would have let through.
pub fn review_stats<'a>(
    journals: impl IntoIterator<Item = &'a [holdpoint_journal::Event]>,
    policy: &Policy,
) -> Vec<ActionStats> {
    let mut by_action: BTreeMap<String, (ActionStats, Vec<f64>)> = BTreeMap::new();
    for events in journals {
        let state = fold(events);
        for gate in state.gates.values().filter(|g| g.kind == GateKind::Approval) {
            let (s, times) = by_action.entry(gate.action.clone()).or_insert_with(|| {
                (
                    ActionStats {
                        action: gate.action.clone(),
                        ..ActionStats::default()
                    },
                    Vec::new(),
                )
            });
            s.gates += 1;
            let e = policy.evaluate(&gate.action, &gate.args, None);
            if e.verdict == Verdict::Allow {
                s.would_auto_approve += 1;
                *s.auto_approving_rules
                    .entry(e.rule.unwrap_or_else(|| "(default)".into()))
                    .or_default() += 1;
            }
            let Some(d) = &gate.decision else {
                s.open += 1;
                continue;
            };
            if d.by == Principal::system() {
                s.timed_out += 1;
                continue;
            }
            match d.decision {
                Decision::Approve => s.approved += 1,
                Decision::Edit { .. } => s.edited += 1,
                Decision::Reject { .. } => s.rejected += 1,
                Decision::Respond { .. } => {}
            }
            let secs = (d.at - gate.requested_at).num_milliseconds() as f64 / 1000.0;
            if secs < FAST_DECISION_SECS {
                s.fast_decisions += 1;
            }
            times.push(secs);
        }
    }
    by_action
        .into_values()
        .map(|(mut s, mut times)| {
            let decided = (s.approved + s.edited + s.rejected) as f64;
            if decided > 0.0 {
                s.approve_rate = s.approved as f64 / decided;
                s.edit_rate = s.edited as f64 / decided;
                s.reject_rate = s.rejected as f64 / decided;
            }
            times.sort_by(|a, b| a.total_cmp(b));
            s.median_secs_to_decide = match times.len() {
                0 => None,
                n if n % 2 == 1 => Some(times[n / 2]),
                n => Some((times[n / 2 - 1] + times[n / 2]) / 2.0),
            };
            s
        })
        .collect()
}
