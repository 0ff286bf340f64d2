//! Guardrails: which actions run on their own, which are blocked, which wait for a
//! person — so people are asked only where it matters.
//!
//! A [`Policy`] is an ordered list of [`Rule`]s; the first rule whose action and
//! condition match decides. Conditions look at the action's arguments (as JSON, by a
//! dotted path), at the agent's stated confidence, or run Rust code. The verdict, the
//! rule and a readable reason are journaled (`policy-evaluated`), so a run replays the
//! verdict it got even after the policy changes.
//!
//! ```
//! use holdpoint_engine::policy::{Condition, Op, Policy, Rule};
//! use holdpoint_engine::journal::Verdict;
//! use serde_json::json;
//!
//! let policy = Policy::new(Verdict::RequireApproval)
//!     .rule(Rule::new("refunds.small", "send_money", Verdict::Allow)
//!         .when(Condition::compare("amount_cents", Op::Le, 10_000)))
//!     .rule(Rule::new("refunds.large", "send_money", Verdict::RequireApproval));
//! let e = policy.evaluate("send_money", &json!({"amount_cents": 25_000}), None);
//! assert_eq!(e.verdict, Verdict::RequireApproval);
//! assert_eq!(e.rule.as_deref(), Some("refunds.large"));
//! ```

use holdpoint_journal::{ApproverLevel, GateSpec, TimeoutOutcome, Verdict};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// An ordered list of rules and a default verdict.
#[derive(Clone, Debug)]
pub struct Policy {
    pub default: Verdict,
    pub rules: Vec<Rule>,
}

impl Default for Policy {
    /// With no rules, every action waits for a person: the safe default.
    fn default() -> Self {
        Policy::new(Verdict::RequireApproval)
    }
}

/// One rule: for `action` (or `*`), when `condition` holds, `verdict`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub action: String,
    pub condition: Condition,
    pub verdict: Verdict,
    /// Shown instead of the generated explanation.
    pub reason: Option<String>,
    /// The gate's approvers, quorum and deadlines, for `RequireApproval`.
    pub gate: GateSpec,
    /// Trust that grows (opt-in): after this many consecutive approvals without edits,
    /// by as many distinct reviewers, of gates this rule asked for, the action runs
    /// without asking — up to that many times, then one is asked again; any edit,
    /// reject or timeout makes it ask until trust is earned anew.
    pub trust_after: Option<u32>,
}

/// A condition written in Rust: the args (as JSON) and the stated confidence.
pub type Predicate = Arc<dyn Fn(&Value, Option<f64>) -> bool + Send + Sync>;

/// When a rule applies.
#[derive(Clone)]
pub enum Condition {
    Always,
    /// Compares the argument at a dotted path (`"payment.amount_cents"`) with a value.
    /// A missing argument never matches.
    Compare {
        arg: String,
        op: Op,
        value: Value,
    },
    /// The agent stated a confidence below this (an action with no stated confidence
    /// does not match).
    ConfidenceBelow(f64),
    All(Vec<Condition>),
    Any(Vec<Condition>),
    /// Rust code over the args (as JSON) and the stated confidence.
    Custom {
        description: String,
        test: Predicate,
    },
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Always => f.write_str("Always"),
            Condition::Compare { arg, op, value } => write!(f, "{arg} {op} {value}"),
            Condition::ConfidenceBelow(t) => write!(f, "confidence < {t}"),
            Condition::All(c) => f.debug_tuple("All").field(c).finish(),
            Condition::Any(c) => f.debug_tuple("Any").field(c).finish(),
            Condition::Custom { description, .. } => write!(f, "Custom({description})"),
        }
    }
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        })
    }
}

/// A policy's answer for one action.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub verdict: Verdict,
    pub rule: Option<String>,
    /// Why, for a person: "amount_cents 25000 > 10000 (rule refunds.large)".
    pub reason: String,
    pub gate: GateSpec,
    /// The matching rule's `trust_after`.
    pub trust_after: Option<u32>,
    /// Allowed on the rule's trust (see [`Evaluation::with_trust`]).
    pub trusted: bool,
}

impl Evaluation {
    /// Applies trust that grows. `history` is the rule's latest entries, newest first
    /// (decisions of people, and runs allowed on trust). A `RequireApproval` becomes
    /// `Allow` when, skipping the runs allowed on trust since, the last `n` decisions
    /// were unchanged approvals by `n` different people — and fewer than `n` runs were
    /// allowed on that trust since: then one is asked again (a spot check), so a person
    /// keeps looking and an edit or a reject takes the trust away.
    pub fn with_trust(mut self, history: &[holdpoint_journal::RuleDecision]) -> Evaluation {
        use holdpoint_journal::{DecisionKind, Principal};
        let (Some(n), Some(rule), Verdict::RequireApproval) = (self.trust_after, &self.rule, self.verdict)
        else {
            return self;
        };
        let n = n as usize;
        let autos = history.iter().take_while(|d| d.auto).count();
        let people: Vec<_> = history[autos..].iter().filter(|d| !d.auto).take(n).collect();
        let unchanged = people
            .iter()
            .all(|d| d.kind == DecisionKind::Approve && d.by != Principal::system());
        let mut who: Vec<&Principal> = people.iter().map(|d| &d.by).collect();
        who.sort();
        who.dedup();
        if n > 0 && autos < n && people.len() == n && unchanged && who.len() == n {
            self.verdict = Verdict::Allow;
            self.trusted = true;
            self.reason = format!(
                "trusted: the last {n} requests under rule {rule} were approved unchanged by {n} different reviewers (rule {rule})"
            );
        }
        self
    }
}

fn lookup<'v>(args: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(args, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn compare(actual: &Value, op: Op, expected: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering = match (actual, expected) {
        (Value::Number(a), Value::Number(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a.partial_cmp(&b),
            _ => None,
        },
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (a, b) if matches!(op, Op::Eq | Op::Ne) => {
            Some(if a == b { Ordering::Equal } else { Ordering::Less })
        }
        _ => None,
    };
    let Some(o) = ordering else { return false };
    match op {
        Op::Lt => o == Ordering::Less,
        Op::Le => o != Ordering::Greater,
        Op::Gt => o == Ordering::Greater,
        Op::Ge => o != Ordering::Less,
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
    }
}

impl Condition {
    pub fn compare(arg: &str, op: Op, value: impl Into<Value>) -> Condition {
        Condition::Compare {
            arg: arg.to_string(),
            op,
            value: value.into(),
        }
    }

    /// Rust code over the args read into the action's own type. Args that do not read
    /// into `A` never match.
    pub fn typed<A: serde::de::DeserializeOwned>(
        description: &str,
        test: impl Fn(&A) -> bool + Send + Sync + 'static,
    ) -> Condition {
        Condition::custom(description, move |args, _| {
            serde_json::from_value::<A>(args.clone()).is_ok_and(|a| test(&a))
        })
    }

    pub fn custom(
        description: &str,
        test: impl Fn(&Value, Option<f64>) -> bool + Send + Sync + 'static,
    ) -> Condition {
        Condition::Custom {
            description: description.to_string(),
            test: Arc::new(test),
        }
    }

    /// `Some(explanation)` when the condition holds.
    pub fn check(&self, args: &Value, confidence: Option<f64>) -> Option<String> {
        match self {
            Condition::Always => Some(String::new()),
            Condition::Compare { arg, op, value } => {
                let actual = lookup(args, arg)?;
                compare(actual, *op, value).then(|| format!("{arg} {actual} {op} {value}"))
            }
            Condition::ConfidenceBelow(t) => {
                let c = confidence?;
                (c < *t).then(|| format!("confidence {c} < {t}"))
            }
            Condition::All(cs) => {
                let parts: Option<Vec<String>> = cs.iter().map(|c| c.check(args, confidence)).collect();
                parts.map(|p| {
                    p.into_iter()
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" and ")
                })
            }
            Condition::Any(cs) => cs.iter().find_map(|c| c.check(args, confidence)),
            Condition::Custom { description, test } => test(args, confidence).then(|| description.clone()),
        }
    }
}

impl Rule {
    pub fn new(name: &str, action: &str, verdict: Verdict) -> Rule {
        Rule {
            name: name.to_string(),
            action: action.to_string(),
            condition: Condition::Always,
            verdict,
            reason: None,
            gate: GateSpec::default(),
            trust_after: None,
        }
    }
    /// Opt in to trust that grows (see [`Rule::trust_after`]).
    pub fn trust_after(mut self, approvals: u32) -> Rule {
        self.trust_after = Some(approvals);
        self
    }
    pub fn when(mut self, condition: Condition) -> Rule {
        self.condition = condition;
        self
    }
    pub fn reason(mut self, reason: &str) -> Rule {
        self.reason = Some(reason.to_string());
        self
    }
    pub fn gate(mut self, gate: GateSpec) -> Rule {
        self.gate = gate;
        self
    }
    fn applies_to(&self, action: &str) -> bool {
        self.action == "*" || self.action == action
    }
}

impl Policy {
    pub fn new(default: Verdict) -> Policy {
        Policy {
            default,
            rules: Vec::new(),
        }
    }

    pub fn rule(mut self, rule: Rule) -> Policy {
        self.rules.push(rule);
        self
    }

    /// The first matching rule's verdict, or the default.
    pub fn evaluate(&self, action: &str, args: &Value, confidence: Option<f64>) -> Evaluation {
        for rule in self.rules.iter().filter(|r| r.applies_to(action)) {
            if let Some(why) = rule.condition.check(args, confidence) {
                let what = rule.reason.clone().unwrap_or_else(|| {
                    if why.is_empty() {
                        format!("{action}: {}", rule.verdict)
                    } else {
                        format!("{action}: {why}")
                    }
                });
                return Evaluation {
                    verdict: rule.verdict,
                    rule: Some(rule.name.clone()),
                    reason: format!("{what} (rule {})", rule.name),
                    gate: rule.gate.clone(),
                    trust_after: rule.trust_after,
                    trusted: false,
                };
            }
        }
        Evaluation {
            verdict: self.default,
            rule: None,
            reason: format!("{action}: no rule matched; the default is {}", self.default),
            gate: GateSpec::default(),
            trust_after: None,
            trusted: false,
        }
    }

    /// Reads a policy from TOML:
    ///
    /// ```toml
    /// default = "require-approval"          # allow | deny | require-approval
    ///
    /// [[rule]]
    /// name = "refunds.small"
    /// action = "send_money"                 # or "*"
    /// when = { arg = "amount_cents", op = "<=", value = 10000 }
    /// verdict = "allow"
    ///
    /// [[rule]]
    /// name = "refunds.large"
    /// action = "send_money"
    /// verdict = "require-approval"
    /// roles = ["finance"]                   # who may decide (default: any reviewer)
    /// quorum = 2                            # distinct approvals needed
    /// timeout_secs = 14400                  # the first group's deadline
    /// escalate = [{ roles = ["cfo"], timeout_secs = 3600 }]
    /// on_timeout = "reject"                 # or "approve"
    /// decisions = ["approve", "reject"]     # no edits at this gate
    /// trust_after = 5                       # opt-in: stop asking after 5 unchanged
    ///                                       # approvals by 5 different reviewers
    ///
    /// [[rule]]
    /// name = "unsure"
    /// action = "*"
    /// when = { confidence_below = 0.7 }
    /// verdict = "require-approval"
    /// ```
    /// `when` may also be `{ all = [...] }` or `{ any = [...] }` of those.
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Policy::new(file.default);
        for r in file.rule {
            let mut levels = vec![ApproverLevel {
                roles: r.roles,
                timeout_secs: r.timeout_secs,
            }];
            levels.extend(r.escalate.into_iter().map(|l| ApproverLevel {
                roles: l.roles,
                timeout_secs: l.timeout_secs,
            }));
            if levels.len() == 1 && levels[0].roles.is_empty() && levels[0].timeout_secs.is_none() {
                levels.clear();
            }
            if r.quorum == 0 {
                return Err(format!("rule {}: quorum must be at least 1", r.name));
            }
            policy.rules.push(Rule {
                name: r.name,
                action: r.action,
                condition: r
                    .when
                    .map(ConditionSpec::into_condition)
                    .transpose()?
                    .unwrap_or(Condition::Always),
                verdict: r.verdict,
                reason: r.reason,
                gate: GateSpec {
                    levels,
                    quorum: r.quorum,
                    on_timeout: r.on_timeout,
                    allowed: r.decisions,
                },
                trust_after: r.trust_after,
            });
        }
        Ok(policy)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default = "require_approval")]
    default: Verdict,
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

fn require_approval() -> Verdict {
    Verdict::RequireApproval
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    action: String,
    #[serde(default)]
    when: Option<ConditionSpec>,
    verdict: Verdict,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default = "one")]
    quorum: u32,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    escalate: Vec<LevelSpec>,
    #[serde(default)]
    on_timeout: TimeoutOutcome,
    #[serde(default)]
    trust_after: Option<u32>,
    /// Decisions the gate takes (default: approve, edit, reject).
    #[serde(default)]
    decisions: Vec<holdpoint_journal::DecisionKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelSpec {
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ConditionSpec {
    Compare { arg: String, op: Op, value: Value },
    Confidence { confidence_below: f64 },
    All { all: Vec<ConditionSpec> },
    Any { any: Vec<ConditionSpec> },
}

impl ConditionSpec {
    fn into_condition(self) -> Result<Condition, String> {
        Ok(match self {
            ConditionSpec::Compare { arg, op, value } => Condition::Compare { arg, op, value },
            ConditionSpec::Confidence { confidence_below } => {
                if !(0.0..=1.0).contains(&confidence_below) {
                    return Err(format!(
                        "confidence_below must be within 0..1, got {confidence_below}"
                    ));
                }
                Condition::ConfidenceBelow(confidence_below)
            }
            ConditionSpec::All { all } => Condition::All(
                all.into_iter()
                    .map(Self::into_condition)
                    .collect::<Result<_, _>>()?,
            ),
            ConditionSpec::Any { any } => Condition::Any(
                any.into_iter()
                    .map(Self::into_condition)
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}
